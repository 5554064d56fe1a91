import sys, random; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ortcmp import run_both
import numpy as np
rng = np.random.default_rng(3); random.seed(3)
ok = 0; n = 0
for trial in range(150):
    N, C, H, W = random.randint(1, 2), random.randint(1, 3), random.randint(1, 9), random.randint(1, 9)
    X = rng.standard_normal((N, C, H, W)).astype(np.float32)
    R = random.randint(1, 5)
    x1 = rng.uniform(-3, W + 2, R); y1 = rng.uniform(-3, H + 2, R)
    rois = np.stack([x1, y1, x1 + rng.uniform(0, 8, R), y1 + rng.uniform(0, 8, R)], 1).astype(np.float32)
    bi = rng.integers(0, N, R).astype(np.int64)
    attrs = {"mode": random.choice(["avg", "max"]), "output_height": random.randint(1, 4), "output_width": random.randint(1, 4),
             "sampling_ratio": random.choice([0, 0, 1, 2, 3]), "spatial_scale": random.choice([1.0, 0.5, 2.0])}
    opset = random.choice([10, 16])
    if opset == 16: attrs["coordinate_transformation_mode"] = random.choice(["half_pixel", "output_half_pixel"])
    r = run_both("RoiAlign", [("X", X), ("rois", rois), ("bi", bi)], attrs, 1, opset, quiet=True)
    if not r: print(opset, attrs)
    ok += r; n += 1
print(ok, "of", n)

import sys, itertools, random
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import numpy as np, torch, onnx
from onnx import helper, TensorProto as T
from onnx.reference import ReferenceEvaluator
import kiln.ops as ops
DEV = os.environ.get('KDEV', 'cpu')
from kiln.ops.dtypes import to_torch, to_numpy
rng = np.random.default_rng(1); random.seed(1)

def check(X, roi, scales, sizes, attrs, opset=19):
    ins = [("X", X), ("roi", roi), ("scales", scales), ("sizes", sizes)]
    names = [n if a is not None else "" for n, a in ins]
    node = helper.make_node("Resize", names, ["Y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in ins if a is not None],
                          [helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(X.dtype), None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    ref = ReferenceEvaluator(m)
    try:
        exp = ref.run(None, {n: a for n, a in ins if a is not None})[0]
    except Exception as e:
        return None
    got = ops.lookup("Resize", opset)([to_torch(a, DEV) if a is not None else None for _, a in ins], attrs, DEV, 1)
    got = to_numpy(got)
    if got.shape != exp.shape or not np.allclose(got.astype(np.float64), exp.astype(np.float64), rtol=1e-4, atol=1e-4 if X.dtype != np.float16 else 0.07):
        print("MISMATCH", attrs, X.shape, X.dtype, scales, sizes, roi, got.shape, exp.shape)
        if got.shape == exp.shape: print(np.abs(got.astype(np.float64)-exp).max())
        return False
    return True

n_ok = n_bad = n_skip = 0
ctms = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize"]
for trial in range(int(os.environ.get('NTRIAL', 1500))):
    mode = random.choice(["nearest", "linear", "cubic"])
    rank = random.choice([2, 3, 4])
    shape = [random.randint(1, 6) for _ in range(rank)]
    dtype = random.choice([np.float32, np.float32, np.float64, np.uint8, np.int8, np.float16, np.int32])
    X = (rng.standard_normal(shape) * 50).astype(dtype) if dtype not in (np.uint8,) else rng.integers(0, 255, shape).astype(dtype)
    attrs = {"mode": mode, "coordinate_transformation_mode": random.choice(ctms)}
    if mode == "nearest": attrs["nearest_mode"] = random.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
    if mode == "cubic": attrs["cubic_coeff_a"] = random.choice([-0.75, -0.5]); attrs["exclude_outside"] = random.choice([0, 1])
    if mode != "nearest" and random.random() < 0.4: attrs["antialias"] = 1
    use_axes = random.random() < 0.3
    axes = sorted(random.sample(range(rank), random.randint(1, rank))) if use_axes else list(range(rank))
    if use_axes:
        random.shuffle(axes); attrs["axes"] = axes
    roi = None
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize":
        st = rng.uniform(-0.2, 0.5, len(axes)); en = st + rng.uniform(0.1, 1.0, len(axes))
        roi = np.concatenate([st, en]).astype(np.float32)
        attrs["extrapolation_value"] = float(random.choice([0.0, 7.0]))
    if random.random() < 0.5:
        scales = np.array([random.choice([0.5, 0.6, 0.75, 1.0, 1.3, 1.5, 2.0, 2.7, 3.0]) for _ in axes], np.float32); sizes = None
    else:
        sizes = np.array([random.randint(1, 10) for _ in axes], np.int64); scales = None
        if random.random() < 0.3: attrs["keep_aspect_ratio_policy"] = random.choice(["not_larger", "not_smaller"])
    if roi is None and random.random() < 0.5:
        roi = np.array([], np.float32)
    if scales is None and random.random() < 0.5:
        scales = np.array([], np.float32)
    r = check(X, roi, scales, sizes, attrs)
    if r is None: n_skip += 1
    elif r: n_ok += 1
    else: n_bad += 1
print("ok", n_ok, "bad", n_bad, "skip", n_skip)

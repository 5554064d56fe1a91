import sys, random
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import numpy as np, torch
from onnx import helper, TensorProto as T
from onnx.reference import ReferenceEvaluator
import kiln.ops as ops
DEV = os.environ.get('KDEV', 'cpu')
from kiln.ops.dtypes import to_torch, to_numpy
rng = np.random.default_rng(2); random.seed(2)

def ref_vs_kiln(op, opset, ins, attrs, out_type=T.FLOAT, rtol=1e-4, atol=1e-4):
    names = [n if a is not None else "" for n, a in ins]
    node = helper.make_node(op, names, ["Y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in ins if a is not None],
                          [helper.make_tensor_value_info("Y", out_type, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    try:
        exp = ReferenceEvaluator(m).run(None, {n: a for n, a in ins if a is not None})[0]
    except Exception:
        return True
    got = to_numpy(ops.lookup(op, opset)([to_torch(a, DEV) if a is not None else None for _, a in ins], attrs, DEV, 1))
    if got.shape != exp.shape or not np.allclose(got.astype(np.float64), exp.astype(np.float64), rtol=rtol, atol=atol):
        print("MISMATCH", op, attrs, [a.shape for _, a in ins if a is not None], got.shape, exp.shape)
        if got.shape == exp.shape: print("   maxdiff", np.abs(got.astype(np.float64) - exp).max())
        return False
    return True

ok = bad = 0
for trial in range(300):
    nd = random.choice([1, 2, 2, 3])
    mode = random.choice(["nearest", "linear", "cubic"])
    pm = random.choice(["zeros", "border", "reflection"])
    ac = random.choice([0, 1])
    ins_shape = [random.randint(1, 5) for _ in range(nd)]
    out_shape = [random.randint(1, 4) for _ in range(nd)]
    X = rng.standard_normal([2, 2] + ins_shape).astype(np.float32)
    grid = (rng.standard_normal([2] + out_shape + [nd]) * 1.5).astype(np.float32)
    if random.random() < 0.3:  # hit exact pixel centres / halves
        grid = np.round(grid * 4) / 4
    r = ref_vs_kiln("GridSample", 20, [("X", X), ("grid", grid)], {"mode": mode, "padding_mode": pm, "align_corners": ac})
    ok += r; bad += not r
print("gridsample ok", ok, "bad", bad)
ok = bad = 0
for trial in range(60):
    nd = random.choice([2, 3])
    N = random.randint(1, 3)
    theta = rng.standard_normal((N, nd, nd + 1)).astype(np.float32)
    size = np.array([N, 2] + [random.randint(1, 5) for _ in range(nd)], np.int64)
    r = ref_vs_kiln("AffineGrid", 20, [("theta", theta), ("size", size)], {"align_corners": random.choice([0, 1])})
    ok += r; bad += not r
print("affinegrid ok", ok, "bad", bad)
ok = bad = 0
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
    r = ref_vs_kiln("RoiAlign", opset, [("X", X), ("rois", rois), ("bi", bi)], attrs)
    ok += r; bad += not r
print("roialign ok", ok, "bad", bad)
ok = bad = 0
for trial in range(200):
    B, C, NB = random.randint(1, 2), random.randint(1, 3), random.randint(0, 12)
    cpb = random.choice([0, 1])
    boxes = rng.uniform(0, 10, (B, NB, 4)).astype(np.float32)
    if random.random() < 0.3: boxes = np.round(boxes)
    scores = rng.uniform(0, 1, (B, C, NB)).astype(np.float32)
    if random.random() < 0.3: scores = np.round(scores * 4) / 4
    ins = [("boxes", boxes), ("scores", scores), ("m", np.array([random.randint(0, 6)], np.int64)), ("iou", np.array([random.choice([0.0, 0.3, 0.5])], np.float32))]
    if random.random() < 0.5: ins.append(("st", np.array([random.choice([0.2, 0.5])], np.float32)))
    r = ref_vs_kiln("NonMaxSuppression", 11, ins, {"center_point_box": cpb}, out_type=T.INT64, atol=0)
    ok += r; bad += not r
print("nms ok", ok, "bad", bad)

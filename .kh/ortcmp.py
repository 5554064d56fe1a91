"""Differential check of a kiln op against onnxruntime on a single-node model."""
import sys, numpy as np, onnx, torch, onnxruntime as ort
from onnx import helper, TensorProto
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import kiln.ops as ops
DEV = os.environ.get('KDEV', 'cpu')
from kiln.ops.dtypes import to_torch, to_numpy

def run_both(op, inputs, attrs, n_out, opset, out_types=None, domain="", atol=1e-5, rtol=1e-4, quiet=False):
    """inputs: list of (name, ndarray or None)."""
    in_names = [nm if a is not None else "" for nm, a in inputs]
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, in_names, outs, domain=domain, **attrs)
    g_in = [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for nm, a in inputs if a is not None]
    g_out = [helper.make_tensor_value_info(o, out_types[i] if out_types else TensorProto.FLOAT, None) for i, o in enumerate(outs)]
    graph = helper.make_graph([node], "g", g_in, g_out)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    exp = sess.run(None, {nm: a for nm, a in inputs if a is not None})
    impl = ops.lookup(op, opset, domain)
    conv = {}
    for k, v in attrs.items():
        conv[k] = v
    res = impl([to_torch(a, DEV) if a is not None else None for _, a in inputs], conv, torch.device(DEV), n_out)
    if not isinstance(res, tuple): res = (res,)
    ok = True
    for i, (e, r) in enumerate(zip(exp, res)):
        got = to_numpy(r, helper.np_dtype_to_tensor_dtype(e.dtype))
        if got.shape != e.shape:
            print("  out", i, "shape", got.shape, e.shape); ok = False; continue
        if not np.allclose(got.astype(np.float64), e.astype(np.float64), atol=atol, rtol=rtol, equal_nan=True):
            ok = False
            d = np.abs(got.astype(np.float64) - e.astype(np.float64))
            print("  out", i, "max diff", np.nanmax(d), "n bad", (d > atol + rtol*np.abs(e.astype(np.float64))).sum(), "of", d.size)
            if not quiet: print(got.ravel()[:20], "\n", e.ravel()[:20])
    return ok

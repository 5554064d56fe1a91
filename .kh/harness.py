"""Mini harness: run single-node ONNX backend cases directly through kiln.ops (no engine)."""
import re, sys, traceback, warnings
warnings.filterwarnings("ignore")
import numpy as np, onnx, torch
from onnx import helper, numpy_helper
from onnx.backend.test.case import node
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
DEV = os.environ.get("KDEV", "cpu")
import kiln.ops as ops
if "--stub" in sys.argv: sys.path.insert(0, "/tmp/kh"); import convstub
from kiln.ops.dtypes import to_torch, to_numpy

pat = re.compile(sys.argv[1])
verbose = "v" in sys.argv[2:]
cases = [c for c in node.collect_testcases(None) if pat.search(c.name) and not c.name.endswith("_expanded")]

def attr_val(a):
    v = helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.STRING: return v.decode()
    if a.type == onnx.AttributeProto.STRINGS: return [s.decode() for s in v]
    if a.type == onnx.AttributeProto.TENSOR: return to_torch(numpy_helper.to_array(v), DEV)
    if a.type == onnx.AttributeProto.INTS: return list(v)
    if a.type == onnx.AttributeProto.FLOATS: return list(v)
    return v

npass = nfail = 0
for c in cases:
    m = c.model
    opset = {o.domain: o.version for o in m.opset_import}
    g = m.graph
    if len(g.node) != 1:
        print("SKIP multi-node", c.name); continue
    n = g.node[0]
    for inputs, outputs in c.data_sets:
        A = lambda x: numpy_helper.to_array(x) if hasattr(x, "HasField") else np.asarray(x)
        inputs = [A(i) for i in inputs]; outputs = [A(o) for o in outputs]
        try:
            impl = ops.lookup(n.op_type, opset.get(n.domain or "", 0), n.domain)
            vals = dict(zip([i.name for i in g.input], inputs))
            args = [to_torch(vals[x], DEV) if x else None for x in n.input]
            attrs = {a.name: attr_val(a) for a in n.attribute}
            res = impl(args, attrs, torch.device(DEV), len(n.output))
            if not isinstance(res, tuple): res = (res,)
            ok = True
            produced = dict(zip(n.output, res))
            for o, exp in zip(g.output, outputs):
                r = produced[o.name]
                if isinstance(r, torch.Tensor) and r.device.type != torch.device(DEV).type: print(c.name, "WRONG DEVICE", r.device); ok = False
                got = to_numpy(r, o.type.tensor_type.elem_type)
                exp = np.asarray(exp)
                if got.shape != exp.shape:
                    ok = False; print(c.name, o.name, "shape", got.shape, exp.shape); continue
                if exp.dtype.kind in "fc" or exp.dtype.itemsize == 1 and exp.dtype.kind == "V" or str(exp.dtype).startswith("float"):
                    ge, ee = got.astype(np.float64), exp.astype(np.float64)
                    good = np.allclose(ge, ee, rtol=1e-3, atol=1e-7, equal_nan=True)
                else:
                    good = np.array_equal(got, exp)
                if got.dtype != exp.dtype:
                    print(c.name, o.name, "dtype", got.dtype, exp.dtype); good = False
                if not good:
                    ok = False; print(c.name, o.name, "MISMATCH");
                    if verbose: print(got, "\nexpected\n", exp)
            if ok: npass += 1
            else: nfail += 1
        except Exception as e:
            nfail += 1; print(c.name, "ERROR", type(e).__name__, str(e)[:300])
            if verbose: traceback.print_exc()
print(f"pass {npass} fail {nfail}")

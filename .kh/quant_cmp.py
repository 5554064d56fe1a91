import sys; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ortcmp import run_both
import numpy as np
from onnx import TensorProto as T
import kiln.ops as ops
import kiln.ops.registry as reg
import torch, torch.nn.functional as F
rng = np.random.default_rng(0)
u8 = lambda *s: rng.integers(0, 256, s).astype(np.uint8)
i8 = lambda *s: rng.integers(-128, 128, s).astype(np.int8)
f = lambda *s: (rng.standard_normal(s)*50).astype(np.float32)
ok = True
# QuantizeLinear per-axis, blocked, int16/uint16
ok &= run_both("QuantizeLinear", [("x", f(3,4,5)), ("s", np.array([0.5,1.5,2.5,0.3],np.float32)), ("z", u8(4))], {"axis":1}, 1, 21, out_types=[T.UINT8])
ok &= run_both("QuantizeLinear", [("x", f(3,4,6)), ("s", np.abs(f(3,4,2))+0.1), ("z", i8(3,4,2))], {"axis":2, "block_size":3}, 1, 21, out_types=[T.INT8])
ok &= run_both("QuantizeLinear", [("x", f(3,4,7)), ("s", np.abs(f(3,4,2))+0.1), ("z", i8(3,4,2))], {"axis":-1, "block_size":4}, 1, 21, out_types=[T.INT8])
ok &= run_both("QuantizeLinear", [("x", np.arange(-10,10,0.5).astype(np.float32)), ("s", np.array(1.0,np.float32))], {}, 1, 13, out_types=[T.UINT8])
ok &= run_both("QuantizeLinear", [("x", f(2,8)*1000), ("s", np.array(0.7,np.float32)), ("z", np.array(3, np.int16))], {}, 1, 21, out_types=[T.INT16])
ok &= run_both("QuantizeLinear", [("x", f(2,8)*1000), ("s", np.array(0.7,np.float32)), ("z", np.array(30000, np.uint16))], {}, 1, 21, out_types=[T.UINT16])
ok &= run_both("QuantizeLinear", [("x", f(2,8).astype(np.float16)), ("s", np.array(0.7,np.float16))], {"output_dtype": T.INT8}, 1, 21, out_types=[T.INT8])
# DequantizeLinear
ok &= run_both("DequantizeLinear", [("x", u8(3,4,5)), ("s", np.array([0.5,1.5,2.5,0.3],np.float32)), ("z", u8(4))], {"axis":1}, 1, 21)
ok &= run_both("DequantizeLinear", [("x", i8(3,4,7)), ("s", np.abs(f(3,4,2))+0.1), ("z", i8(3,4,2))], {"axis":2, "block_size":4}, 1, 21)
ok &= run_both("DequantizeLinear", [("x", rng.integers(-2**31, 2**31, (10,)).astype(np.int32)), ("s", np.array(0.001,np.float32))], {}, 1, 21)
ok &= run_both("DequantizeLinear", [("x", u8(3,4)), ("s", np.array(0.25,np.float16)), ("z", u8())], {}, 1, 21, out_types=[T.FLOAT16])
# DynamicQuantizeLinear
for x in [f(3,4), np.abs(f(5)), -np.abs(f(5)), ]:
    ok &= run_both("DynamicQuantizeLinear", [("x", x)], {}, 3, 11, out_types=[T.UINT8, T.FLOAT, T.UINT8])
# MatMulInteger
ok &= run_both("MatMulInteger", [("A", u8(2,5,300)), ("B", u8(300,4)), ("az", u8()), ("bz", u8(4))], {}, 1, 10, out_types=[T.INT32])
ok &= run_both("MatMulInteger", [("A", i8(5,7)), ("B", i8(7,4)), ("az", i8()), ("bz", i8(4))], {}, 1, 10, out_types=[T.INT32])
ok &= run_both("MatMulInteger", [("A", u8(5,7)), ("B", i8(7,4))], {}, 1, 10, out_types=[T.INT32])
# QLinearMatMul
ok &= run_both("QLinearMatMul", [("a", u8(5,30)), ("as", np.array(0.01,np.float32)), ("az", u8()), ("b", u8(30,4)), ("bs", np.array(0.02,np.float32)), ("bz", u8()), ("ys", np.array(0.3,np.float32)), ("yz", u8())], {}, 1, 10, out_types=[T.UINT8])
ok &= run_both("QLinearMatMul", [("a", i8(3,5,30)), ("as", np.array(0.01,np.float32)), ("az", i8()), ("b", i8(30,4)), ("bs", np.array([0.02,0.01,0.03,0.04],np.float32)), ("bz", i8(4)), ("ys", np.array(0.3,np.float32)), ("yz", i8())], {}, 1, 10, out_types=[T.INT8])
# ConvInteger / QLinearConv
ok &= run_both("ConvInteger", [("x", u8(1,4,9,9)), ("w", u8(6,2,3,3)), ("xz", u8()), ("wz", u8())], {"group":2, "pads":[1,0,2,1], "strides":[2,1]}, 1, 10, out_types=[T.INT32])
ok &= run_both("QLinearConv", [("x", u8(1,4,9,9)), ("xs", np.array(0.01,np.float32)), ("xz", u8()), ("w", u8(6,4,3,3)), ("ws", np.abs(f(6))/1000+0.001), ("wz", u8(6)),("ys", np.array(0.2,np.float32)), ("yz", u8()), ("B", rng.integers(-1000,1000,(6,)).astype(np.int32))], {"pads":[1,1,1,1]}, 1, 10, out_types=[T.UINT8])
ok &= run_both("QLinearConv", [("x", i8(2,3,9)), ("xs", np.array(0.01,np.float32)), ("xz", i8()), ("w", i8(5,3,3)), ("ws", np.array(0.003,np.float32)), ("wz", np.array(0,np.int8)),("ys", np.array(0.05,np.float32)), ("yz", i8())], {"dilations":[2]}, 1, 10, out_types=[T.INT8])
print("ALL OK" if ok else "FAILURES")

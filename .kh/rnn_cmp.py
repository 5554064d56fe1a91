import sys; import os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ortcmp import run_both
import numpy as np
rng = np.random.default_rng(0)
f = lambda *s: rng.standard_normal(s).astype(np.float32)
seq, batch, inp, hid = 5, 3, 4, 6
for op, ng in [("RNN", 1), ("GRU", 3), ("LSTM", 4)]:
    for direction in ["forward", "reverse", "bidirectional"]:
        nd = 2 if direction == "bidirectional" else 1
        for lens in [None, np.array([5, 2, 4], np.int32)]:
          for layout in [0]:
           for extra in [{}, {"clip": 0.5}, {"lbr": 1}, {"acts": 1}, {"inf": 1}]:
            if "lbr" in extra and op != "GRU": continue
            if "inf" in extra and op != "LSTM": continue
            attrs = dict(hidden_size=hid, direction=direction, layout=layout)
            if "clip" in extra: attrs["clip"] = 0.5
            if "lbr" in extra: attrs["linear_before_reset"] = 1
            if "inf" in extra: attrs["input_forget"] = 1
            if "acts" in extra:
                a = {"RNN": ["LeakyRelu"], "GRU": ["HardSigmoid", "Elu"], "LSTM": ["HardSigmoid", "ScaledTanh", "Affine"]}[op]
                attrs["activations"] = a * nd
                attrs["activation_alpha"] = [0.3, 0.7, 0.2, 0.4, 0.5, 0.6][:len(a)*nd]
                attrs["activation_beta"] = [0.1, 0.9, 0.3, 0.2, 0.8, 0.25][:len(a)*nd]
            X = f(seq, batch, inp) if layout == 0 else f(batch, seq, inp)
            hshape = (nd, batch, hid) if layout == 0 else (batch, nd, hid)
            ins = [("X", X), ("W", f(nd, ng*hid, inp)), ("R", f(nd, ng*hid, hid)), ("B", f(nd, 2*ng*hid)),
                   ("sequence_lens", lens), ("initial_h", f(*hshape))]
            nout = 2
            if op == "LSTM":
                ins += [("initial_c", f(*hshape)), ("P", f(nd, 3*hid))]
                nout = 3
            ok = run_both(op, ins, attrs, nout, 14, quiet=True)
            if not ok: print(op, direction, lens, layout, extra)
print("done")

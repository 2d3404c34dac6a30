"""Worst error per family (select_fwd: out, lse; select_bwd: dq, dk, dv, dgates) per dtype from the
JSON lines that tests/test_select_kernels.py writes when NSA_ERR_LOG is set."""
import json
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
worst = defaultdict(lambda: (0.0, 0.0, ""))
for r in rows:
    for name, e in r["err"].items():
        fam = "select_fwd" if name in ("out", "lse") else "select_bwd"
        key = (fam, r["dtype"], name)
        if e > worst[key][0]:
            worst[key] = (e, r["tol"][name], f"{r['variant']} d={r['d']}")
print(f"{len(rows)} cases")
for (fam, dt, name), (e, t, where) in sorted(worst.items()):
    print(f"{fam:10s} {dt:9s} {name:7s} worst {e:.3e} (tol {t:.3e}) at {where}")

import json, os, sys, time
sys.path.insert(0, os.getcwd())
import bench.stacked_matmul_hopper_check as m
rows = []
start = time.perf_counter()
m.speed_rows(4096, time.perf_counter() + 60, 2, 10, rows)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe2.json"), "w"), indent=1)
for r in rows:
    print(r.get("case"), {k: round(v, 3) for k, v in r.items() if k.endswith(("_ms", "_over_static"))}, r.get("status"), flush=True)
print("took", time.perf_counter() - start)

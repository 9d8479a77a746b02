import json, os, sys, time
sys.path.insert(0, os.getcwd())
import jax
import bench.stacked_matmul_hopper_check as m
print(jax.__version__, jax.devices()[0].device_kind, m.available(), flush=True)
rows = []
start = time.perf_counter()
m.addend_speed_rows(4096, time.perf_counter() + 95, 2, 10, rows)
out = os.environ.get("OUT", "/tmp")
with open(os.path.join(out, "probe.json"), "w") as f:
    json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, f, indent=1)
for r in rows:
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
print("took", time.perf_counter() - start)

"""Copy the optimised HLO and the buffer assignment of each dumped train step into one flat folder,
gzipped (the device tool brings back few, small files): what bench/e2e.py --xla-flags
"--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*" leaves behind, ready to read here.

    python bench/collect_dumps.py DIR OUT [--max N]
"""

import gzip
import shutil
import sys
from pathlib import Path


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    limit = int(sys.argv[sys.argv.index("--max") + 1]) if "--max" in sys.argv else 6
    target.mkdir(parents=True, exist_ok=True)
    wanted = sorted(
        path for path in source.glob("*train_step*")
        if path.name.endswith("after_optimizations.txt") or path.name.endswith("buffer-assignment.txt")
    )
    for path in wanted[:limit]:
        kind = "buffers" if "buffer-assignment" in path.name else "hlo"
        with path.open("rb") as raw, gzip.open(target / f"{path.name.split('.', 1)[0]}_{kind}.txt.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        print(path.name, path.stat().st_size)


if __name__ == "__main__":
    main()

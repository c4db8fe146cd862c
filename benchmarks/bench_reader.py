"""Reader throughput: our shard reader vs the published per-sample safetensors reader.

Builds (once, in --dir) a dataset of real SFD sizes -- texture 32x16x16, semantic
16x16x16, DINOv2 features 768x16x16, float16, with flipped latents, ~430 KiB per
sample -- in the published layout, converts it to shards with ``sfd-data convert``,
then measures one epoch of each reader with 0, 1 and 2 loader workers, from a warm
page cache and from a cold one (dropped before each run), against the plain
sequential read speed of the same files, and our reader from a local S3 server
(moto, in its own process).

    python benchmarks/bench_reader.py                 # everything, prints a table
    python benchmarks/bench_reader.py --samples 2048 --no-s3 --workers 0 2
    python benchmarks/bench_reader.py --dino-storage float16 int8 --readers ours   # compact features too

``--dino-storage int8`` also converts the dataset with compact features (``sfd-data convert
--dino-storage int8``, into DIR/shards-int8) and measures our reader on it ("ours, int8").

Shards hold 16 samples (~7 MB; ``BENCH_SHARD_SIZE`` changes it, with another --dir).
Every measurement runs in a fresh process (torch on one thread, for both readers).
The figures are samples/s over one epoch after the first batch, the median of
--repeats runs, MB/s = samples/s x the dataset's bytes per sample, and the CPU time
of the reading process itself per sample (what reading costs the trainer's process;
with workers, their CPU time is not in it).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 64  # samples per batch for both readers (one micro-batch of ours)
SHARD_SIZE = int(os.environ.get("BENCH_SHARD_SIZE", 16))  # samples per shard (~7 MB), see prepare()


# -- page cache ------------------------------------------------------------------------------
def drop_page_cache(files: list[str]) -> str:
    """Empties the page cache; returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def sequential_read(files: list[str], block: int = 8 << 20) -> tuple[float, int]:
    """Reads ``files`` front to back; returns (seconds, bytes)."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - start, total


# -- data --------------------------------------------------------------------------------------
def prepare(root: str, samples: int, storages: list[str] = ("float16",)) -> tuple[str, dict[str, str]]:
    """Writes the published-layout folder and converts it once per feature storage; returns their paths."""
    sys.path.insert(0, HERE)
    from bench_reader_published import write_published_folder

    from sfd_train.data_pipeline.convert import convert_published

    published = os.path.join(root, "published")
    marker = os.path.join(published, ".complete")
    if not os.path.exists(marker):
        print(f"writing {samples} samples in the published layout to {published} ...", file=sys.stderr)
        write_published_folder(published, samples)
        open(marker, "w").close()
    shards = {}
    for storage in storages:
        shards[storage] = os.path.join(root, "shards" if storage == "float16" else f"shards-{storage}")
        if not os.path.exists(os.path.join(shards[storage], "manifest.json")):
            print(f"converting to shards in {shards[storage]} ...", file=sys.stderr)
            # 16-sample (~7 MB) shards: moto re-reads the whole object for every ranged GET,
            # so big objects would measure moto, not the reader (7 MB is also a good S3
            # request size). Locally the shard size does not matter to our reader.
            convert_published(published, shards[storage], shard_size=SHARD_SIZE, workers=2,
                              dino_storage=None if storage == "float16" else storage,
                              command=f"bench_reader.py prepare --dino-storage {storage}")
    return published, shards


def files_of(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.tar")) + glob.glob(os.path.join(folder, "*.safetensors")))


# -- one measurement (in a child process) -----------------------------------------------------
def measure(args: argparse.Namespace) -> dict:
    import torch

    # Both readers' torch ops run on one thread: on a small, busy machine OpenMP's
    # spinning threads otherwise dominate and the comparison measures OpenMP.
    torch.set_num_threads(1)

    if args.reader == "ours":
        from sfd_train.data_pipeline.reader import CompositeLatentLoader

        options = {"client_kwargs": {"endpoint_url": args.endpoint}} if args.endpoint else None
        loader = CompositeLatentLoader(args.path, global_batch_size=4 * BATCH, micro_batch_size=BATCH, rank=0, world_size=1,
                                       seed=0, num_workers=args.workers, storage_options=options)
        batches = loader.schedule.micro_per_epoch
        it = iter(loader)
    else:
        sys.path.insert(0, HERE)
        from bench_reader_published import PublishedLatentDataset

        dataset = PublishedLatentDataset(args.path)
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=args.workers,
                                             generator=torch.Generator().manual_seed(0))
        batches = len(loader)
        it = iter(loader)
    start = time.perf_counter()
    first = next(it)
    t_first = time.perf_counter()
    cpu_first = time.process_time()
    samples = 0
    for _ in range(batches - 1):
        batch = next(it)
        samples += batch["x"].shape[0]
    elapsed = time.perf_counter() - t_first
    # CPU time of this (the training) process alone: what reading costs the trainer, and a figure a
    # busy machine disturbs far less than the wall time.
    cpu = time.process_time() - cpu_first
    assert first["dino"].shape[1:] == (768, 16, 16) and first["x"].shape[1:] == (48, 16, 16)
    return {"samples": samples, "seconds": elapsed, "first_batch_s": t_first - start, "main_cpu_s": cpu}


def run_child(reader: str, path: str, workers: int, endpoint: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_measure", "--reader", reader, "--path", path, "--workers", str(workers)]
    if endpoint:
        cmd += ["--endpoint", endpoint]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- S3 (moto in its own process) ---------------------------------------------------------------
@contextlib.contextmanager
def moto_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    # moto accepts any credentials; these dummies keep real ones out of the benchmark.
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE")}
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_PROFILE", None)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(shards: str, endpoint: str, name: str = "shards") -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    if not fs.exists("bench"):
        fs.mkdir("bench")
    fs.put(shards + "/", f"bench/{name}/", recursive=True)
    return f"s3://bench/{name}"


# -- main ----------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024**2 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": os.getloadavg()}


def row(name: str, workers, cache: str, result: dict, per_sample: float, ceiling: float) -> dict:
    sps = result["samples"] / result["seconds"]
    mbs = sps * per_sample / 1e6
    return {"reader": name, "workers": workers, "cache": cache, "samples_per_s": sps, "mb_per_s": mbs,
            "of_ceiling": mbs / ceiling, "first_batch_s": result["first_batch_s"],
            "main_cpu_us_per_sample": 1e6 * result["main_cpu_s"] / result["samples"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/sfd-bench", help="where the benchmark data lives (created once, ~5.5 GB)")
    parser.add_argument("--samples", type=int, default=6144, help="samples in the benchmark dataset (default 6144, ~2.7 GB per format)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    parser.add_argument("--readers", nargs="+", default=["ours", "published"], choices=["ours", "published"])
    parser.add_argument("--caches", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) measurement")
    parser.add_argument("--no-local", action="store_true", help="skip the local measurements (S3 only)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the median is reported")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--dino-storage", nargs="+", default=["float16"], choices=["float16", "int8"],
                        help="feature storages of our reader's dataset (int8: compact features, as 'ours, int8')")
    sub = parser.add_subparsers(dest="command", help=argparse.SUPPRESS)
    m = sub.add_parser("_measure", help=argparse.SUPPRESS)
    m.add_argument("--reader", required=True)
    m.add_argument("--path", required=True)
    m.add_argument("--workers", type=int, required=True)
    m.add_argument("--endpoint", default="")
    args = parser.parse_args(argv)
    if args.command == "_measure":
        print(json.dumps(measure(args)))
        return 0

    published, shards = prepare(args.dir, args.samples, args.dino_storage)
    # One "reader" per dataset our reader measures: "ours" (float16 features), "ours, int8", ...
    ours = {("ours" if storage == "float16" else f"ours, {storage}"): path for storage, path in shards.items()}
    paths = {**ours, "published": published}
    files = {k: files_of(v) for k, v in paths.items()}
    per_sample = {k: sum(os.path.getsize(f) for f in v) / args.samples for k, v in files.items()}
    info = machine()
    results = {"machine": info, "samples": args.samples, "bytes_per_sample": per_sample, "rows": []}
    first = next(iter(ours))

    # Ceiling: sequential passes over the same files from a cold cache (median of the repeats).
    ceilings = []
    for _ in range(args.repeats):
        method = drop_page_cache([f for v in files.values() for f in v])
        seconds, nbytes = sequential_read(files[first])
        ceilings.append(nbytes / seconds / 1e6)
    ceiling = statistics.median(ceilings)
    results.update(cache_drop=method, ceiling_mb_per_s=ceiling, ceiling_runs=ceilings)
    print(f"sequential read, cold ({method}): {ceiling:.0f} MB/s {[round(c) for c in ceilings]}", file=sys.stderr)

    def repeated(entries, workers, cache, endpoint=""):
        """Runs each ``(name, reader, path)`` of ``entries`` --repeats times, taking turns, so that a
        machine whose load drifts disturbs the readers being compared alike."""
        runs = {name: [] for name, _, _ in entries}
        for _ in range(args.repeats):
            for name, reader, path in entries:
                if cache == "cold":
                    drop_page_cache(files[reader])
                elif cache == "warm":
                    sequential_read(files[reader])
                runs[name].append(run_child("published" if reader == "published" else "ours", path, workers, endpoint))
        for name, reader, _ in entries:
            best = sorted(runs[name], key=lambda r: r["samples"] / r["seconds"])[len(runs[name]) // 2]  # the median run
            r = row(name, workers, cache, best, per_sample[reader], ceiling)
            r["runs_samples_per_s"] = [x["samples"] / x["seconds"] for x in runs[name]]
            r["runs_main_cpu_us_per_sample"] = [1e6 * x["main_cpu_s"] / x["samples"] for x in runs[name]]
            results["rows"].append(r)
            print(f"{name:>16} {cache:>6} workers={workers}: {r['samples_per_s']:7.0f} samples/s {r['mb_per_s']:6.0f} MB/s "
                  f"{[round(v) for v in r['runs_samples_per_s']]}, main-process CPU "
                  f"{[round(v) for v in r['runs_main_cpu_us_per_sample']]} us/sample", file=sys.stderr)

    readers = [name for name in paths if (name == "published" and "published" in args.readers)
               or (name != "published" and "ours" in args.readers)]
    for cache in [] if args.no_local else args.caches:
        for workers in args.workers:
            repeated([(reader, reader, paths[reader]) for reader in readers], workers, cache)

    if not args.no_s3:
        with moto_server() as endpoint:
            urls = {}
            for reader, folder in ours.items():
                print(f"uploading {folder} to moto ...", file=sys.stderr)
                urls[reader] = upload(folder, endpoint, os.path.basename(folder))
            for workers in args.workers:
                repeated([(f"{reader}, S3 (moto)", reader, url) for reader, url in urls.items()], workers, "server",
                         endpoint)
    results["machine"]["load_average_end"] = os.getloadavg()

    print(f"\nMachine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, Linux {info['kernel']}, torch {info['torch']}")
    print(f"Dataset: {args.samples} samples, " + ", ".join(f"{per_sample[k] / 1024:.0f} KiB/sample ({k})" for k in paths)
          + f"; batch {BATCH}")
    print(f"Sequential read ceiling (cold, 8 MiB reads): {ceiling:.0f} MB/s; cache dropped with {method}\n")
    print("| reader | workers | page cache | samples/s | MB/s | % of ceiling | main-process CPU us/sample |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        cpu = statistics.median(r["runs_main_cpu_us_per_sample"])
        print(f"| {r['reader']} | {r['workers']} | {r['cache']} | {r['samples_per_s']:.0f} | {r['mb_per_s']:.0f} | "
              f"{100 * r['of_ceiling']:.0f}% | {cpu:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

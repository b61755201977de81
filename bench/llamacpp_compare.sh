#!/usr/bin/env bash
# dmoe's engine_bench against llama.cpp (llama-bench, llama-batched-bench) on the same checkpoint,
# on this machine, in one run: ROUNDS rounds, each running every precision once on both systems,
# one system right after the other (which goes first flips from round to round). Prints per
# precision and figure the median tokens/s of each, the ratio dmoe / llama.cpp, dmoe's median
# limit_fraction (batch-1 rows) and the read bandwidth dmoe measured; writes the same as JSON to
# OUT/summary.json and keeps every raw output under OUT.
#
# Usage: bash bench/llamacpp_compare.sh [--help]      (settings through the environment)
#   LLAMA_BIN     llama.cpp's build/bin with llama-bench, llama-batched-bench
#                 (default /work/peer/llama.cpp/build/bin; how to build: ../shared/tools/peer/README.md)
#   MODEL_DIR     dmoe / HF checkpoint directory (default /tmp/dmoe-bench/small)
#   GGUF_DIR      where <basename MODEL_DIR>-{bf16,q8_0,f32}.gguf live (default /work/peer/gguf);
#                 missing ones are converted with hf_to_gguf_deepseek2.py from PEER_TOOLS
#                 (default <repo>/../shared/tools/peer) using CONVERT_PYTHON (default /usr/bin/python3
#                 when it has numpy, else python3; without CONVERT_PYTHON the script installs Debian's
#                 python3-numpy when a conversion needs it)
#   ROUNDS        rounds (default 3); figures are medians over rounds
#   PRECISIONS    dmoe weight dtypes (default "bf16 int8 f32"); int8 <-> Q8_0, bf16 <-> BF16, f32 <-> F32;
#                 bf16a16: bf16 weights with bf16 activations (engine_bench --bf16-activations) <-> BF16
#   THREADS       llama.cpp threads (default 2). dmoe's engine uses every core (its thread pool is
#                 hardware_concurrency wide), so keep THREADS = nproc for a like-for-like comparison.
#   ENGINE_BENCH  dmoe's bench binary (default: built from the working tree first with
#                 `bazel build //bench:engine_bench`, the default -O2 build, then bazel-bin's)
#   OUT           folder for raw outputs and summary.json (default: a new mktemp -d folder; kept)
#   QUICK=1       smoke test: engine_bench --batches 1 --prefill 64 (no --depth); llama-bench -p 64
#                 -n 16 (no depth run); llama-batched-bench -npp 64 -ntg 16 -npl 16.
#
# What is compared with what (the two benches do not measure identical workloads):
#   decode b1 ctx16     dmoe: batch 1, 16 tokens in the cache | llama-bench tg128: 128 tokens
#                       generated from an empty cache (context 0..127, averaged)
#   decode b1 d1024     dmoe: batch 1 at context 1024 | llama-bench -p 0 -n 128 -d 1024
#                       (context 1024..1151; the 1024-token fill is not timed)
#   decode 16/64 seqs   dmoe: 16/64 sequences, 16 tokens each in the cache, one token each per step
#                       | llama-batched-bench: 16/64 sequences after a 128-token prompt each,
#                       128 steps (context 128..255), speed_tg = generated tokens/s over all
#   prefill 512         dmoe: one sequence of 512 tokens in one step | llama-bench pp512
# llama.cpp runs with its defaults otherwise (f16 KV cache where dmoe's is f32, flash attention auto,
# n_batch 2048, n_ubatch 512, a warm-up run); its BF16 weights imply 16-bit activations in the mat-muls.
# llama.cpp ranks expert groups with DeepSeek-V3's rule, so its routing differs slightly on
# group-limited models: fine for speed, not a correctness reference.
set -euo pipefail

if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
elif [ $# -gt 0 ]; then
  echo "llamacpp_compare.sh: no arguments (settings through the environment); see --help" >&2
  exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
LLAMA_BIN=${LLAMA_BIN:-/work/peer/llama.cpp/build/bin}
MODEL_DIR=${MODEL_DIR:-/tmp/dmoe-bench/small}
GGUF_DIR=${GGUF_DIR:-/work/peer/gguf}
PEER_TOOLS=${PEER_TOOLS:-$repo/../shared/tools/peer}
ROUNDS=${ROUNDS:-3}
PRECISIONS=${PRECISIONS:-bf16 int8 f32}
THREADS=${THREADS:-2}
if [ -z "${ENGINE_BENCH:-}" ]; then
  # Built here, from the working tree: bazel-bin follows the configuration of the last bazel
  # command, so a binary found there may be another configuration's, from older sources.
  (cd "$repo" && bazel build //bench:engine_bench) >"${TMPDIR:-/tmp}/llamacpp_compare.build.log" 2>&1 ||
    { echo "llamacpp_compare.sh: bazel build //bench:engine_bench failed (${TMPDIR:-/tmp}/llamacpp_compare.build.log)" >&2; exit 1; }
  ENGINE_BENCH=$repo/bazel-bin/bench/engine_bench
fi
QUICK=${QUICK:-0}
OUT=${OUT:-$(mktemp -d -t llamacpp_compare.XXXXXX)}
mkdir -p "$OUT" "$GGUF_DIR"
# A reused OUT: an earlier run's raw outputs would sit beside this run's (only our own files go).
if compgen -G "$OUT/r[0-9]*-*.rc" > /dev/null || [ -e "$OUT/summary.json" ]; then
  echo "llamacpp_compare.sh: removing an earlier run's outputs from $OUT" >&2
  rm -f "$OUT"/r[0-9]*-*.{out,err,rc,cmd} "$OUT/summary.json"
fi
MODEL_DIR=${MODEL_DIR%/}
model_name=$(basename "$MODEL_DIR")

convert_python_chosen=0  # CONVERT_PYTHON from the environment: used as it is, never installed into
[ -n "${CONVERT_PYTHON:-}" ] && convert_python_chosen=1
if [ -z "${CONVERT_PYTHON:-}" ]; then
  CONVERT_PYTHON=python3
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
    CONVERT_PYTHON=/usr/bin/python3
  fi
fi

for f in "$ENGINE_BENCH" "$LLAMA_BIN/llama-bench" "$LLAMA_BIN/llama-batched-bench"; do
  [ -x "$f" ] || { echo "llamacpp_compare.sh: not found or not executable: $f" >&2; exit 1; }
done
[ -f "$MODEL_DIR/config.json" ] || { echo "llamacpp_compare.sh: no $MODEL_DIR/config.json" >&2; exit 1; }
ncpu=$(nproc)
if [ "$THREADS" != "$ncpu" ]; then
  echo "warning: THREADS=$THREADS but nproc=$ncpu; dmoe uses every core, llama.cpp $THREADS" >&2
fi

gguf_type() {
  case "$1" in
    bf16|bf16a16) echo bf16 ;;
    int8) echo q8_0 ;;
    f32) echo f32 ;;
    *) echo "llamacpp_compare.sh: precision '$1' has no llama.cpp counterpart (bf16 int8 f32)" >&2
       return 1 ;;
  esac
}

# The converter's numpy: Debian's python3-numpy, installed (idempotently) where the system python3
# lacks it and CONVERT_PYTHON was not set.
ensure_numpy() {
  "$CONVERT_PYTHON" -c 'import numpy' 2>/dev/null && return 0
  if [ "$convert_python_chosen" = 0 ]; then
    echo "llamacpp_compare.sh: installing python3-numpy for the GGUF converter" >&2
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
    [ "$(id -u)" -ne 0 ] && apt=(sudo -n "${apt[@]}")  # (-n: fail, never wait for a password)
    "${apt[@]}" install -y -qq python3-numpy >/dev/null 2>&1 ||
      { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq python3-numpy >/dev/null; } || true
    CONVERT_PYTHON=/usr/bin/python3
  fi
  "$CONVERT_PYTHON" -c 'import numpy' 2>/dev/null && return 0
  echo "llamacpp_compare.sh: the converter needs numpy in $CONVERT_PYTHON" \
    "(apt-get install -y python3-numpy)" >&2
  exit 1
}

# The GGUF files, converted where missing (written under a temporary name, then renamed).
for p in $PRECISIONS; do
  t=$(gguf_type "$p")
  g=$GGUF_DIR/$model_name-$t.gguf
  [ -s "$g" ] && continue
  conv=$PEER_TOOLS/hf_to_gguf_deepseek2.py
  [ -f "$conv" ] || { echo "llamacpp_compare.sh: converter not found: $conv (set PEER_TOOLS)" >&2; exit 1; }
  ensure_numpy
  echo "converting $MODEL_DIR -> $g ($t)" >&2
  start=$(date +%s)
  nice -n 10 "$CONVERT_PYTHON" "$conv" "$MODEL_DIR" "$g.partial" --outtype "$t" --quiet
  mv "$g.partial" "$g"
  echo "  done in $(( $(date +%s) - start )) s, $(du -h "$g" | cut -f1)" >&2
done

if [ "$QUICK" = 1 ]; then
  dmoe_args=(--batches 1 --prefill 64)
  pp=64 tg=16 depth=0 bb_npp=64 bb_ntg=16 bb_npl=16
else
  # shellcheck disable=SC2054  # commas are part of the flag value
  dmoe_args=(--batches 1,16,64 --depth 1024 --prefill 512)
  pp=512 tg=128 depth=1024 bb_npp=128 bb_ntg=128 bb_npl=16,64
fi

# run NAME CMD...: stdout -> OUT/NAME.out, stderr -> OUT/NAME.err; a failure is reported and
# recorded (OUT/NAME.rc) but does not stop the other runs.
run() {
  local name=$1; shift
  printf '%s\n' "$*" > "$OUT/$name.cmd"
  local rc=0 start=$SECONDS
  "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
  echo "$rc" > "$OUT/$name.rc"
  if [ "$rc" -ne 0 ]; then
    echo "  $name: FAILED (exit $rc), see $OUT/$name.err" >&2
  else
    echo "  $name: $(( SECONDS - start )) s" >&2
  fi
}

run_dmoe() {  # round precision (bf16a16: bf16 weights with --bf16-activations)
  local dtype=$2 extra=()
  if [ "$2" = bf16a16 ]; then dtype=bf16 extra=(--bf16-activations); fi
  run "r$1-$2-dmoe" "$ENGINE_BENCH" --model "$MODEL_DIR" --weight-dtype "$dtype" "${dmoe_args[@]}" \
    "${extra[@]}" --rounds 1 --json
}

run_llama() {  # round precision
  local g
  g=$GGUF_DIR/$model_name-$(gguf_type "$2").gguf
  run "r$1-$2-llama-bench" "$LLAMA_BIN/llama-bench" -m "$g" -p "$pp" -n "$tg" -t "$THREADS" -r 1 \
    -o json
  if [ "$depth" -gt 0 ]; then
    run "r$1-$2-llama-bench-depth" "$LLAMA_BIN/llama-bench" -m "$g" -p 0 -n "$tg" -d "$depth" \
      -t "$THREADS" -r 1 -o json
  fi
  run "r$1-$2-llama-batched" "$LLAMA_BIN/llama-batched-bench" -m "$g" -c 16384 -npp "$bb_npp" \
    -ntg "$bb_ntg" -npl "$bb_npl" -t "$THREADS" --output-format jsonl
}

echo "raw outputs: $OUT" >&2
for r in $(seq 1 "$ROUNDS"); do
  for p in $PRECISIONS; do
    echo "round $r/$ROUNDS, $p" >&2
    if [ $((r % 2)) -eq 1 ]; then
      run_dmoe "$r" "$p"; run_llama "$r" "$p"
    else
      run_llama "$r" "$p"; run_dmoe "$r" "$p"
    fi
  done
done

OUT=$OUT ROUNDS=$ROUNDS PRECISIONS=$PRECISIONS QUICK=$QUICK PP=$pp TG=$tg DEPTH=$depth \
BB_NPP=$bb_npp BB_NTG=$bb_ntg BB_NPL=$bb_npl THREADS=$THREADS MODEL_DIR=$MODEL_DIR \
DMOE_REV=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown) NCPU=$ncpu \
python3 - <<'PY'
import json, os, statistics, sys

env = os.environ
out, rounds = env["OUT"], int(env["ROUNDS"])
precs = env["PRECISIONS"].split()
pp, tg, depth = int(env["PP"]), int(env["TG"]), int(env["DEPTH"])
npl = [int(x) for x in env["BB_NPL"].split(",")]
batches = [1] if env["QUICK"] == "1" else [1, 16, 64]


def read(name):
    try:
        with open(os.path.join(out, name + ".out")) as f:
            return f.read()
    except OSError:
        return ""


def json_lines(text):
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                print(f"  an unreadable JSON line, skipped: {line[:120]}", file=sys.stderr)
    return rows


def json_array(text):
    i = text.find("[")
    if i < 0:
        return []
    try:
        return json.loads(text[i:])
    except ValueError:
        return []


def med(xs):
    return statistics.median(xs) if xs else None


# figure -> (dmoe row matcher, llama.cpp source)
figures = [("decode b1 ctx16", lambda r: r["phase"] == "decode" and r["batch"] == 1 and r["context"] == 16,
            ("bench", lambda t: t["n_prompt"] == 0 and t["n_gen"] == tg and t.get("n_depth", 0) == 0),
            "tg%d" % tg)]
if depth:
    figures.append(("decode b1 d%d" % depth,
                    lambda r: r["phase"] == "decode" and r["batch"] == 1 and r["context"] == depth,
                    ("depth", lambda t: t["n_prompt"] == 0 and t["n_gen"] == tg and t.get("n_depth", 0) == depth),
                    "tg%d @ d%d" % (tg, depth)))
for n in sorted(set(npl) | set(b for b in batches if b > 1)):
    figures.append(("decode %d seqs" % n,
                    (lambda n: lambda r: r["phase"] == "decode" and r["batch"] == n and r["context"] == 16)(n),
                    ("batched", (lambda n: lambda t: t["pl"] == n)(n)),
                    "batched pl%d speed_tg" % n))
figures.append(("prefill %d" % pp, lambda r: r["phase"] == "prefill",
                ("bench", lambda t: t["n_prompt"] == pp and t["n_gen"] == 0),
                "pp%d" % pp))

summary = {"model_dir": env["MODEL_DIR"], "rounds": rounds, "threads_llama": int(env["THREADS"]),
           "nproc": int(env["NCPU"]), "dmoe_rev": env["DMOE_REV"], "quick": env["QUICK"] == "1",
           "llama_build": None, "rows": []}
table = []
for p in precs:
    samples = {f[0]: {"dmoe": [], "llama": [], "limit": [], "bw": []} for f in figures}
    dmoe_bw = []
    for r in range(1, rounds + 1):
        base = "r%d-%s-" % (r, p)
        drows = json_lines(read(base + "dmoe"))
        bench = json_array(read(base + "llama-bench"))
        dep = json_array(read(base + "llama-bench-depth"))
        batched = [x for x in json_lines(read(base + "llama-batched")) if "speed_tg" in x]
        if not batched:  # llama.cpp's LOG may go to stderr on some builds
            try:
                with open(os.path.join(out, base + "llama-batched.err")) as f:
                    batched = [x for x in json_lines(f.read()) if "speed_tg" in x]
            except OSError:
                pass
        for t in bench + dep:
            summary["llama_build"] = summary["llama_build"] or "%s (%s)" % (
                t.get("build_commit"), t.get("build_number"))
        src = {"bench": bench, "depth": dep, "batched": batched}
        dmoe_bw += [x["read_bw_gbs"] for x in drows if "read_bw_gbs" in x]
        for name, dmatch, (skey, lmatch), _ in figures:
            s = samples[name]
            for x in drows:
                if dmatch(x):
                    s["dmoe"].append(x["tokens_per_s"])
                    s["bw"].append(x.get("read_bw_gbs"))
                    if x.get("batch") == 1 and x.get("limit_fraction") is not None:
                        s["limit"].append(x["limit_fraction"])
            for t in src[skey]:
                if lmatch(t):
                    s["llama"].append(t["speed_tg"] if skey == "batched" else t["avg_ts"])
    for name, _, _, lname in figures:
        s = samples[name]
        d, l = med(s["dmoe"]), med(s["llama"])
        row = {"precision": p, "figure": name, "llama_figure": lname,
               "dmoe_tokens_per_s": d, "llama_tokens_per_s": l,
               "ratio": d / l if d and l else None,
               "dmoe_limit_fraction": med(s["limit"]),
               "dmoe_read_bw_gbs": med([b for b in s["bw"] if b is not None]),
               "n_dmoe": len(s["dmoe"]), "n_llama": len(s["llama"]),
               "dmoe_samples": s["dmoe"], "llama_samples": s["llama"]}
        table.append(row)
    summary.setdefault("read_bw_gbs_median", {})[p] = med(dmoe_bw)
summary["rows"] = table
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)


def fmt(v, spec):
    return format(v, spec) if v is not None else "-"


print("dmoe %s vs llama.cpp %s, %s, llama.cpp %d threads, nproc %d, %d round(s), medians"
      % (summary["dmoe_rev"], summary["llama_build"], env["MODEL_DIR"], summary["threads_llama"],
         summary["nproc"], rounds))
hdr = "%-6s %-16s %11s %11s %7s %8s %8s %5s  %s" % ("dtype", "figure", "dmoe tok/s", "llama tok/s",
                                                   "ratio", "limit", "bw GB/s", "n", "llama.cpp figure")
print(hdr)
print("-" * len(hdr))
for row in table:
    print("%-6s %-16s %11s %11s %7s %8s %8s %5s  %s" % (
        row["precision"], row["figure"], fmt(row["dmoe_tokens_per_s"], ".1f"),
        fmt(row["llama_tokens_per_s"], ".1f"), fmt(row["ratio"], ".2f"),
        fmt(row["dmoe_limit_fraction"], ".3f"), fmt(row["dmoe_read_bw_gbs"], ".1f"),
        "%d/%d" % (row["n_dmoe"], row["n_llama"]), row["llama_figure"]))
print("ratio = dmoe / llama.cpp; limit = dmoe's batch-1 limit_fraction; bw = read bandwidth dmoe "
      "measured; n = samples dmoe/llama.cpp")
print("raw outputs and summary.json: %s" % out)
PY

"""Ahead-of-time build of microdit's Triton kernels (issue #34, item 6).

What it does
    Imports every module named in `MODULES` (one that does not exist yet is skipped with a
    message) and compiles each entry of its `BUILDS` list with Triton 3.9, without a GPU,
    into

        kernels/cubin/<name>.sm_80.cubin   SASS for compute capability 8.x (A100; the
                                           8.6/8.9 cards run it too: later minors)
        kernels/cubin/<name>.sm_90.cubin   SASS for 9.0 (H100/H200), built as sm_90a: it
                                           may use wgmma/TMA and loads on 9.0 only
        kernels/cubin/<name>.ptx           PTX that the driver JITs on newer GPUs (10.x,
                                           12.x): the sm_80 build's, `.target sm_80`

    and generates the table the Rust side loads them from, src/backend/triton_kernels.rs
    (committed; its header says not to edit it): `KERNELS`, one
    `launch_plan::TritonKernel` per entry with the entry symbol, the exact `.param` list
    read from the PTX (Triton 3.9's two hidden scratch pointers last) and cross-checked
    against the signature, the constexprs (bools as 0/1), num_warps, the dynamic shared
    memory of each cubin, and the three files by `include_bytes!`.

    Why the PTX is the sm_80 build's: Triton compiles capability 9.0 for `sm_90a`, whose
    PTX (wgmma, setmaxnreg, ...) no other GPU can JIT. Its PTX ISA version is pinned to 8.7
    (CUDA 12.8, the first driver that runs Blackwell GPUs), so every driver of a GPU that
    needs the JIT reads it.

    A BUILDS entry is a dict: name (unique, [A-Za-z0-9_]+), kernel (a @triton.jit
    function), signature ({argument: Triton type} of the runtime arguments: "*<dtype>"
    pointers, "i32", "fp32", the types `launch_plan::ParamType` has), constexprs
    ({argument: int or bool}), num_warps, num_stages; optionally maxnreg and
    enable_fp_fusion (default True, Triton 3.9's default). Other keys are ignored. A
    kernel needing global or profile scratch memory is an error (the table has no room
    for it: the launcher passes null).

    Deterministic: the same sources and toolchain give byte-identical files. The Triton
    cache is a fresh temporary directory, the caller's Triton/LLVM/MLIR/ptxas environment
    variables are dropped, line info is off (it would embed absolute source paths), and
    both targets use the wheel's ptxas 12.9 (Triton would otherwise use its CUDA 13 ptxas
    for sm_90 and write PTX ISA 9.x).

How to run it (from any directory; Python with kernels/requirements.txt installed)
    python kernels/build.py            # rebuild kernels/cubin/ and triton_kernels.rs
    python kernels/build.py --check    # rebuild in a temporary directory and compare
    python kernels/build.py -j 8       # with 8 compiler processes (default: all CPUs)

    Both print, per kernel, `ptxas -v`'s registers, shared memory and spills for sm_80 and
    sm_90 (the wheel's ptxas, as Triton ran it to make the cubin) and for the PTX
    assembled for sm_120 (the JIT path, informational). Both exit 1 when a kernel fails to
    compile, spills (spill stores or loads > 0 bytes) on sm_80 or sm_90, or needs more
    shared memory per block than the target's opt-in limit (sm_80: 163 KiB, sm_90: 227
    KiB); the files are written anyway. Above 99 KiB is a warning: such a kernel cannot
    launch on 8.6/8.9 or 12.x GPUs.

How CI uses it
    `python kernels/build.py --check` exits 1, listing the files, when a committed file
    in kernels/cubin/ or src/backend/triton_kernels.rs differs from a fresh build, is
    missing or is extra (or on the failures above), so the committed binaries always come
    from the committed kernels and the pinned toolchain. The fix: run
    `python kernels/build.py` and commit what it wrote.
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
ROOT = KERNELS_DIR.parent
CUBIN_DIR = KERNELS_DIR / "cubin"
RUST_FILE = ROOT / "src" / "backend" / "triton_kernels.rs"

# The kernel modules, kernels/<name>.py, in the order of the generated table.
MODULES = ["attention", "chains", "topk"]

TRITON_VERSION = "3.9.0"
# (capability, file suffix, ptxas GPU name, shared memory per block with opt-in, bytes).
TARGETS = [(80, "sm_80", "sm_80", 163 * 1024), (90, "sm_90", "sm_90a", 227 * 1024)]
PTX_SUFFIX = "sm_80"  # the build whose PTX ships
PTX_VERSION = 87  # PTX ISA 8.7 (CUDA 12.8)
JIT_GPU = "sm_120"  # the PTX is assembled for it as a check (the JIT GPU with least shared)
SHARED_PORTABLE = 99 * 1024  # the opt-in limit of 8.6, 8.9 and 12.x

HIDDEN_PARAMS = ["global_scratch", "profile_scratch"]
REQUIRED_KEYS = {"name", "kernel", "signature", "constexprs", "num_warps", "num_stages"}
# Triton scalar type -> (launch_plan::ParamType variant, PTX .param type).
SCALAR_TYPES = {"i32": ("I32", ".u32"), "fp32": ("F32", ".f32")}
POINTER = ("Pointer", ".u64 .ptr .global")


class BuildError(Exception):
    pass


def pin_environment(cache_dir):
    """Drops the caller's compiler settings and pins ours (before triton is imported);
    returns the path of the wheel's ptxas."""
    for key in list(os.environ):
        if key.startswith(("TRITON_", "MLIR_", "LLVM_", "AMDGCN_")) or key in (
                "PTXAS_OPTIONS", "DISABLE_PTXAS_OPT", "DISABLE_LLVM_OPT", "NVPTX_ENABLE_DUMP", "USE_IR_LOC"):
            del os.environ[key]
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # so every compile prints its ptxas log
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
    sys.dont_write_bytecode = True  # importing the kernels leaves no __pycache__ behind
    import triton

    if triton.__version__ != TRITON_VERSION:
        raise BuildError(f"needs triton=={TRITON_VERSION} (kernels/requirements.txt), found {triton.__version__}")
    ptxas = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    os.environ["TRITON_PTXAS_PATH"] = ptxas
    os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = ptxas
    return ptxas


def import_kernels_package():
    """Makes `kernels` this directory (the modules import each other relatively), also where
    another package of that name is installed (Hugging Face's `kernels` is on PyPI)."""
    existing = sys.modules.get("kernels")
    if existing is not None:
        if [str(Path(p).resolve()) for p in getattr(existing, "__path__", [])] != [str(KERNELS_DIR)]:
            raise BuildError(f"another module named kernels is already imported: {existing!r}")
        return
    init = KERNELS_DIR / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[str(KERNELS_DIR)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = package
        spec.loader.exec_module(package)
    else:
        package = types.ModuleType("kernels")
        package.__path__ = [str(KERNELS_DIR)]
        sys.modules["kernels"] = package


def load_entries():
    """[(module name, entry)] for the BUILDS entries of the modules that exist."""
    import triton

    import_kernels_package()
    entries, names = [], set()
    for module_name in MODULES:
        if not (KERNELS_DIR / f"{module_name}.py").exists():
            print(f"build.py: kernels/{module_name}.py does not exist yet: skipped", file=sys.stderr)
            continue
        module = importlib.import_module(f"kernels.{module_name}")
        builds = getattr(module, "BUILDS", None)
        if not isinstance(builds, list):
            raise BuildError(f"kernels/{module_name}.py has no BUILDS list")
        for entry in builds:
            where = f"kernels/{module_name}.py BUILDS entry {entry.get('name', '?')!r}"
            missing = REQUIRED_KEYS - entry.keys()
            if missing:
                raise BuildError(f"{where}: missing {sorted(missing)}")
            name = entry["name"]
            if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name in names:
                raise BuildError(f"{where}: names must be unique and [A-Za-z0-9_]+")
            names.add(name)
            if not isinstance(entry["kernel"], triton.runtime.jit.JITFunction):
                raise BuildError(f"{where}: kernel is not a @triton.jit function")
            entries.append((module_name, entry))
    return entries


def compile_args(entry):
    """(signature in argument order with constexprs marked, constexprs, [(runtime argument,
    ParamType variant, PTX type)])."""
    fn, sig, consts, name = entry["kernel"], entry["signature"], entry["constexprs"], entry["name"]
    for key in list(sig) + list(consts):
        if key not in fn.arg_names:
            raise BuildError(f"{name}: {key!r} is not an argument of {fn.__name__}")
    signature, runtime = {}, []
    for arg in fn.arg_names:
        if arg in consts:
            if not isinstance(consts[arg], (bool, int)):
                raise BuildError(f"{name}: constexpr {arg} = {consts[arg]!r}: only int and bool are supported")
            signature[arg] = "constexpr"
        elif arg in sig and sig[arg] != "constexpr":
            ty = sig[arg]
            if ty.startswith("*"):
                runtime.append((arg, *POINTER))
            elif ty in SCALAR_TYPES:
                runtime.append((arg, *SCALAR_TYPES[ty]))
            else:
                raise BuildError(f"{name}: argument {arg}: type {ty!r} is not one of launch_plan::ParamType's "
                                 f"(pointers, {', '.join(SCALAR_TYPES)})")
            signature[arg] = ty
        else:
            raise BuildError(f"{name}: argument {arg} is in neither signature nor constexprs")
    return signature, dict(consts), runtime


PTXAS_STATS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log):
    if "Used " not in log:
        raise BuildError(f"no ptxas -v statistics in:\n{log}")
    return {key: int(m.group(1)) if (m := regex.search(log)) else 0 for key, regex in PTXAS_STATS.items()}


_ENTRIES = []  # set before the worker pool forks


def compile_one(job):
    """In a worker: entry `index` for capability `arch`, as a plain dict."""
    index, arch, ptxas = job
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        entry = _ENTRIES[index][1]
        signature, consts, _ = compile_args(entry)
        options = {"num_warps": entry["num_warps"], "num_stages": entry["num_stages"], "ptx_version": PTX_VERSION,
                   "enable_fp_fusion": entry.get("enable_fp_fusion", True)}
        if entry.get("maxnreg") is not None:
            options["maxnreg"] = entry["maxnreg"]
        src = triton.compiler.ASTSource(fn=entry["kernel"], signature=signature, constexprs=consts)
        log = io.StringIO()  # Triton prints ptxas's -v log here (TRITON_DUMP_PTXAS_LOG)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        meta = compiled.metadata._asdict()
        keep = ["name", "shared", "num_warps", "num_ctas", "tmem_size", "global_scratch_size",
                "profile_scratch_size", "enable_fp_fusion"]
        result = {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"],
                  "meta": {k: meta.get(k) for k in keep}, "stats": parse_ptxas_log(log.getvalue())}
        if arch == next(a for a, s, _, _ in TARGETS if s == PTX_SUFFIX):
            result["jit_stats"] = jit_check(ptxas, result["ptx"], result["meta"]["enable_fp_fusion"])
        return result
    except Exception:  # reported per kernel by the parent
        return {"error": traceback.format_exc()}


def jit_check(ptxas, ptx, fp_fusion):
    """ptxas -v statistics of the portable PTX assembled for JIT_GPU (as a driver would)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-v", *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name={JIT_GPU}",
                              str(src), "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if run.returncode != 0:
        raise BuildError(f"the PTX does not assemble for {JIT_GPU}:\n{run.stderr}")
    return parse_ptxas_log(run.stderr)


PARAM_RE = re.compile(r"^\s*\.param\s+(?P<type>.*?)\s*(?P<name>[A-Za-z_$][\w$]*)(?P<array>\[\d+\])?\s*,?\s*$")


def ptx_params(ptx, function):
    """The PTX types of the .entry's parameters, in order (pointers' .align dropped)."""
    match = re.search(r"\.visible\s+\.entry\s+" + re.escape(function) + r"\s*\((.*?)\)", ptx, re.S)
    if not match:
        raise BuildError(f".entry {function} not found in the PTX")
    params = []
    for line in match.group(1).strip().splitlines():
        m = PARAM_RE.match(line)
        if not m:
            raise BuildError(f"cannot parse the PTX parameter {line.strip()!r}")
        ty = m.group("type")
        params.append(POINTER[1] if ty.startswith(POINTER[1]) else ty + (m.group("array") or ""))
    return params


def kernel_params(entry, ptx, function):
    """[(name, ParamType variant)] in .param order: the PTX's list, which must match the
    signature's runtime arguments followed by the two scratch pointers."""
    expected = compile_args(entry)[2] + [(name, *POINTER) for name in HIDDEN_PARAMS]
    found = ptx_params(ptx, function)
    if found != [ptx_type for _, _, ptx_type in expected]:
        raise BuildError(f"{entry['name']}: the PTX .params {found} do not match the signature "
                         f"{[(n, t) for n, _, t in expected]}")
    return [(name, variant) for name, variant, _ in expected]


def build(out_dir, ptxas, jobs):
    """Compiles every entry into out_dir/cubin/ and out_dir/triton_kernels.rs.

    Returns (kernels, errors, failures, warnings): the built kernels for the report, the
    compile errors, and the ptxas checks' failures and warnings."""
    global _ENTRIES
    _ENTRIES = load_entries()
    work = [(i, arch, ptxas) for i in range(len(_ENTRIES)) for arch, _, _, _ in TARGETS]
    results = {}
    if work:
        with multiprocessing.get_context("fork").Pool(max(1, min(jobs, len(work)))) as pool:
            for job, result in zip(work, pool.imap(compile_one, work, chunksize=1)):
                results[job[:2]] = result

    cubin_dir = out_dir / "cubin"
    cubin_dir.mkdir(parents=True)
    kernels, errors, failures, warnings = [], [], [], []
    for i, (module_name, entry) in enumerate(_ENTRIES):
        name = entry["name"]
        per_target = {suffix: results[(i, arch)] for arch, suffix, _, _ in TARGETS}
        compile_errors = [f"{name} (kernels/{module_name}.py) does not compile for {suffix}:\n{r['error']}"
                          for suffix, r in per_target.items() if "error" in r]
        if compile_errors:
            errors += compile_errors
            continue
        try:
            functions = {r["meta"]["name"] for r in per_target.values()}
            if len(functions) != 1:
                raise BuildError(f"{name}: the entry symbols differ between targets: {sorted(functions)}")
            function = functions.pop()
            params = [kernel_params(entry, r["ptx"], function) for r in per_target.values()]
            if any(p != params[0] for p in params):
                raise BuildError(f"{name}: the .param lists differ between targets")
            for suffix, r in per_target.items():
                meta = r["meta"]
                if meta["global_scratch_size"] or meta["profile_scratch_size"]:
                    raise BuildError(f"{name} {suffix}: needs scratch memory (global {meta['global_scratch_size']} B, "
                                     f"profile {meta['profile_scratch_size']} B per block), which the launcher "
                                     "does not allocate")
                if meta["num_ctas"] != 1 or meta["tmem_size"] or meta["num_warps"] != entry["num_warps"]:
                    raise BuildError(f"{name} {suffix}: clusters, tensor memory or a changed num_warps "
                                     f"({meta['num_ctas']}, {meta['tmem_size']}, {meta['num_warps']})")
        except BuildError as e:
            errors.append(str(e))
            continue
        for suffix, r in per_target.items():
            (cubin_dir / f"{name}.{suffix}.cubin").write_bytes(r["cubin"])
        (cubin_dir / f"{name}.ptx").write_bytes(per_target[PTX_SUFFIX]["ptx"].encode())
        kernels.append({"name": name, "module": module_name, "function": function, "params": params[0],
                        "constexprs": [(k, int(v)) for k, v in entry["constexprs"].items()],
                        "num_warps": entry["num_warps"], "targets": per_target})
        check_limits(name, per_target, failures, warnings)
    (out_dir / "triton_kernels.rs").write_bytes(rust_table(kernels).encode())
    return kernels, errors, failures, warnings


def check_limits(name, per_target, failures, warnings):
    for _, suffix, gpu, limit in TARGETS:
        stats, meta = per_target[suffix]["stats"], per_target[suffix]["meta"]
        shared = meta["shared"] + stats["static_smem"]
        if stats["spill_stores"] or stats["spill_loads"]:
            failures.append(f"{name} {gpu}: spills ({stats['spill_stores']} B stores, {stats['spill_loads']} B loads)")
        if shared > limit:
            failures.append(f"{name} {gpu}: {shared} B of shared memory, above the {limit} B limit")
        elif shared > SHARED_PORTABLE and suffix == PTX_SUFFIX:
            warnings.append(f"{name}: {shared} B of shared memory, above 99 KiB: cannot launch on 8.6/8.9/12.x")


def summary_line(kernel):
    parts = []
    for _, suffix, gpu, _ in TARGETS:
        r = kernel["targets"][suffix]
        parts.append(stats_text(gpu, r["stats"], r["meta"]["shared"]))
    r = kernel["targets"][PTX_SUFFIX]
    parts.append(stats_text(f"ptx->{JIT_GPU}", r["jit_stats"], r["meta"]["shared"]))
    return f"  {kernel['name']:<36} " + " | ".join(parts)


def stats_text(label, stats, dynamic_shared):
    return (f"{label}: {stats['registers']} regs, {dynamic_shared + stats['static_smem']} B shared, "
            f"spills {stats['spill_stores']}/{stats['spill_loads']} B")


RUST_HEADER = """\
// @generated by kernels/build.py (Triton {triton}, ptxas 12.9) from
// {modules}.
// Do not edit: change the kernels and run `python kernels/build.py`. CI runs
// `python kernels/build.py --check`, which fails when this file or kernels/cubin/ is stale.

//! microdit's Triton kernels compiled ahead of time: one [`TritonKernel`] per `BUILDS` entry
//! of kernels/*.py, with its sm_80 and sm_90a cubins and the PTX of its sm_80 build. Plain
//! data (the types are `launch_plan`'s). No kernel uses global or profile scratch memory
//! (the build checks), so both hidden scratch pointers take null.

use super::launch_plan::{{ParamType, TritonKernel}};
"""


def rust_table(kernels):
    modules = sorted({k["module"] for k in kernels}, key=MODULES.index)
    listed = ", ".join(f"kernels/{m}.py" for m in modules) if modules else "no kernel modules"
    out = [RUST_HEADER.format(triton=TRITON_VERSION, modules=listed) + "\n#[rustfmt::skip]",
           "pub static KERNELS: &[TritonKernel] = &["]
    for k in kernels:
        name = k["name"]
        shared = ", ".join(str(k["targets"][suffix]["meta"]["shared"]) for _, suffix, _, _ in TARGETS)
        out += ["    TritonKernel {",
                f'        name: "{name}",',
                f'        function: "{k["function"]}",',
                "        params: &["]
        out += [f'            ("{param}", ParamType::{variant}),' for param, variant in k["params"]]
        out += ["        ],", "        constexprs: &["]
        out += [f'            ("{const}", {value}),' for const, value in k["constexprs"]]
        out += ["        ],",
                f"        num_warps: {k['num_warps']},",
                f"        shared: [{shared}],"]
        for _, suffix, _, _ in TARGETS:
            field = "cubin_" + suffix.replace("_", "")
            out.append(f'        {field}: include_bytes!("../../kernels/cubin/{name}.{suffix}.cubin"),')
        out += [f'        ptx: include_bytes!("../../kernels/cubin/{name}.ptx"),', "    },"]
    out.append("];")
    return "\n".join(out) + "\n"


def managed_files(cubin_dir, rust_file):
    """{path relative to the repository: bytes} of the files the build owns, on disk."""
    files = {}
    if cubin_dir.is_dir():
        for path in sorted(cubin_dir.iterdir()):
            if path.is_file() and path.suffix in (".cubin", ".ptx"):
                files[f"kernels/cubin/{path.name}"] = path.read_bytes()
    if rust_file.is_file():
        files["src/backend/triton_kernels.rs"] = rust_file.read_bytes()
    return files


def main():
    parser = argparse.ArgumentParser(description="Builds kernels/cubin/ and src/backend/triton_kernels.rs.")
    parser.add_argument("--check", action="store_true",
                        help="build in a temporary directory and fail if the committed files differ")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="microdit-kernels-") as tmp:
        tmp = Path(tmp)
        try:
            ptxas = pin_environment(tmp / "triton-cache")
            kernels, errors, failures, warnings = build(tmp / "out", ptxas, args.jobs)
        except BuildError as e:
            print(f"build.py: {e}", file=sys.stderr)
            return 1
        built = managed_files(tmp / "out" / "cubin", tmp / "out" / "triton_kernels.rs")

        print(f"ptxas -v ({ptxas}): registers, shared memory per block, spill stores/loads")
        for kernel in kernels:
            print(summary_line(kernel))
        cubins = sum(len(v) for p, v in built.items() if p.endswith(".cubin"))
        ptx = sum(len(v) for p, v in built.items() if p.endswith(".ptx"))
        print(f"{len(kernels)} kernels: cubins {cubins} B, PTX {ptx} B; {time.monotonic() - start:.0f} s")
        for message in warnings:
            print(f"build.py: warning: {message}", file=sys.stderr)
        for message in errors + failures:
            print(f"build.py: {message}", file=sys.stderr)

        if args.check:
            committed = managed_files(CUBIN_DIR, RUST_FILE)
            stale = [(p, "differs from a fresh build") for p in sorted(built.keys() & committed.keys())
                     if built[p] != committed[p]]
            stale += [(p, "missing") for p in sorted(built.keys() - committed.keys())]
            stale += [(p, "extra: no BUILDS entry makes it") for p in sorted(committed.keys() - built.keys())]
            for path, why in stale:
                print(f"build.py --check: {path}: {why}", file=sys.stderr)
            if stale:
                print("build.py --check: run `python kernels/build.py` and commit the result", file=sys.stderr)
            else:
                print(f"build.py --check: the {len(committed)} committed files match the build")
            return 1 if stale or errors or failures else 0

        CUBIN_DIR.mkdir(exist_ok=True)
        for path in CUBIN_DIR.iterdir():
            if path.is_file() and path.suffix in (".cubin", ".ptx") and f"kernels/cubin/{path.name}" not in built:
                path.unlink()
        for rel, data in built.items():
            if not (ROOT / rel).is_file() or (ROOT / rel).read_bytes() != data:
                (ROOT / rel).write_bytes(data)
        print(f"wrote {len(built)} files: kernels/cubin/, src/backend/triton_kernels.rs")
        return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())

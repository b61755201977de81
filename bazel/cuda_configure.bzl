"""Finds the CUDA toolkit on this machine (no download): @local_cuda.

Writes @local_cuda//:defs.bzl with CUDA_AVAILABLE, NVCC and CUDA_ROOT, and @local_cuda//:BUILD with
`headers`, `cudart` and `cublas` (empty libraries when there is no toolkit, so that everything else
still builds; the CUDA code then compiles to stubs that report "built without the CUDA toolkit").
DMOE_CUDA_PATH overrides /usr/local/cuda; DMOE_REQUIRE_CUDA=1 (--config=cuda) makes a missing
toolkit an error instead.
"""

_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "headers",
    hdrs = glob(["include/**"]),
    includes = ["include"],
)

cc_library(
    name = "cudart",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lcudart"],
    deps = [":headers"],
)

cc_library(
    name = "cublas",
    linkopts = ["-L{lib}", "-Wl,-rpath,{lib}", "-lcublas", "-lcublasLt"],
    deps = [":cudart"],
)
"""

_STUB_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(name = "headers")

cc_library(name = "cudart")

cc_library(name = "cublas")
"""

def _cuda_configure_impl(rctx):
    root = rctx.os.environ.get("DMOE_CUDA_PATH", "/usr/local/cuda")
    nvcc = rctx.path(root + "/bin/nvcc")
    if not nvcc.exists:
        if rctx.os.environ.get("DMOE_REQUIRE_CUDA", "") == "1":
            fail("--config=cuda: no CUDA toolkit at %s (nvcc missing; set DMOE_CUDA_PATH)" % root)
        rctx.file("BUILD", _STUB_BUILD)
        rctx.file("defs.bzl", "CUDA_AVAILABLE = False\nNVCC = \"\"\nCUDA_ROOT = \"\"\n")
        return
    rctx.symlink(root + "/include", "include")
    rctx.file("BUILD", _BUILD.format(lib = root + "/lib64"))
    rctx.file("defs.bzl", "CUDA_AVAILABLE = True\nNVCC = \"%s\"\nCUDA_ROOT = \"%s\"\n" % (nvcc, root))

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["DMOE_CUDA_PATH", "DMOE_REQUIRE_CUDA"],
    local = True,
)

"""Finds the CUDA toolkit on this machine (no download): @local_cuda.

Writes @local_cuda//:defs.bzl with CUDA_AVAILABLE, NVCC and CUDA_ROOT, and @local_cuda//:BUILD with
`headers`, `cudart` and `cublas` (headers; dlopen'ed at run time) (empty libraries when there is no toolkit, so that everything else
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

# cuBLAS's headers only: kernels/cuda/blas.cc loads the library with dlopen on first use
# (linked, libcublas + libcublasLt cost every process ~215 MB of resident memory and ~0.1 s at
# start, GPU or not). DMOE_CUDA_LIB_DIR: where to find it when the loader's path does not.
cc_library(
    name = "cublas",
    defines = ["DMOE_CUDA_LIB_DIR={lib}"],
    linkopts = ["-ldl"],
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

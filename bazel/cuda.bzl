"""cuda_library: .cu sources compiled by the toolkit's nvcc (our own small rule; no rules_cuda)."""

load("@local_cuda//:defs.bzl", "CUDA_AVAILABLE", "NVCC")

# Hopper and Ampere: native code for both, and PTX for sm_90 (newer GPUs JIT it).
CUDA_ARCH_FLAGS = ("-gencode 'arch=compute_90,code=[sm_90,compute_90]' " +
                   "-gencode arch=compute_80,code=sm_80")

# For the C++ (gcc) side of CUDA code: DMOE_HAVE_CUDA=1 when the toolkit was found.
CUDA_DEFINES = ["DMOE_HAVE_CUDA=1"] if CUDA_AVAILABLE else []

def cuda_library(name, srcs, hdrs = [], deps = [], **kwargs):
    """nvcc -c each .cu (C++17, -O2, PIC, sm_90 + sm_80) and wrap the objects in a cc_library.

    The .cu files may include only `hdrs` (workspace-relative) and the toolkit's headers. Without
    a toolkit the library is empty: its callers compile stubs (CUDA_DEFINES).
    """
    objs = []
    if CUDA_AVAILABLE:
        for src in srcs:
            obj = "_nvcc/%s/%s.pic.o" % (name, src[:-len(".cu")])
            native.genrule(
                name = "%s_nvcc_%s" % (name, src[:-len(".cu")].replace("/", "_")),
                srcs = [src] + hdrs,
                outs = [obj],
                cmd = ("%s -c -std=c++17 -O2 -Xcompiler -fPIC -I. %s $(location %s) -o $@" %
                       (NVCC, CUDA_ARCH_FLAGS, src)),
                message = "nvcc %s" % src,
            )
            objs.append(obj)
    native.cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        deps = deps + (["@local_cuda//:cudart"] if CUDA_AVAILABLE else []),
        alwayslink = True,
        **kwargs
    )

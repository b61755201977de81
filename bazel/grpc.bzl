"""cc_grpc_library: protoc + grpc_cpp_plugin from Debian, run in a genrule (no downloads)."""

def cc_grpc_library(name, src, deps = [], grpc = True, **kwargs):
    """C++ messages (and gRPC stubs when grpc=True) for one .proto file of this package.

    The generated headers are included as "<package>/<base>.pb.h" / ".grpc.pb.h".
    """
    base = src[:-len(".proto")]
    outs = [base + ".pb.h", base + ".pb.cc"]
    cmd = "/usr/bin/protoc -I. --cpp_out=$(GENDIR)"
    if grpc:
        outs += [base + ".grpc.pb.h", base + ".grpc.pb.cc"]
        cmd += " --grpc_out=$(GENDIR) --plugin=protoc-gen-grpc=/usr/bin/grpc_cpp_plugin"
    native.genrule(
        name = name + "_gen",
        srcs = [src],
        outs = outs,
        cmd = cmd + " $(location " + src + ")",
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        copts = ["-Wno-unused-parameter", "-Wno-array-bounds"],
        deps = deps + ["//third_party:grpc"],
        **kwargs
    )

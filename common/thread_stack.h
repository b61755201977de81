// Thread stacks that are as large as asked for, even with a large static TLS in the process.
//
// glibc carves the static TLS of every module loaded at startup (and the thread descriptor) out of
// the stack of each new thread, so pthread_attr_setstacksize(N) yields N minus that much usable
// stack (glibc bug 11787). Debian's OpenBLAS has a 60 KiB TLS segment and Debian's civetweb (the
// prometheus-cpp exposer behind /metrics) asks for 100 KiB stacks: its workers were left with
// ~34 KiB, and sending its error page (GET /, any unknown path) overflowed them with SIGSEGV.
//
// Linking //common:thread_stack (alwayslink; //common:metrics depends on it) defines
// pthread_attr_setstacksize in the executable, exported so that shared libraries bind to it: it
// adds StaticTlsReserve() to every requested size, then calls glibc's. Stacks given by
// pthread_attr_setstack (caller-owned memory) are left alone.
#ifndef DMOE_COMMON_THREAD_STACK_H_
#define DMOE_COMMON_THREAD_STACK_H_

#include <cstddef>

namespace dmoe {

// Bytes added to each stack size set through pthread_attr_setstacksize: the static TLS of the
// modules loaded when first called (each PT_TLS segment's memsz plus its alignment), plus an
// allowance for glibc's thread descriptor and static TLS surplus, rounded up to whole pages.
// Computed once (modules dlopen'ed later get dynamic TLS, which is not on the stack). Thread-safe.
size_t StaticTlsReserve();

}  // namespace dmoe

#endif  // DMOE_COMMON_THREAD_STACK_H_

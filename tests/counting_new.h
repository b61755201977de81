// Counts calls to the global operator new while asked, for tests that check a hot path does not
// allocate. Linking //tests:counting_new replaces the global operator new / delete of the whole
// test binary (every thread), so link it only into such tests.
#ifndef DMOE_TESTS_COUNTING_NEW_H_
#define DMOE_TESTS_COUNTING_NEW_H_

#include <cstdint>
#include <new>

namespace dmoe {
// Starts counting from zero.
void StartCountingNew();
// Stops counting and returns the number of calls to operator new (any thread) since the start.
uint64_t StopCountingNew();

// True if a call to operator new from here is counted: the override is linked and bound before
// libstdc++'s (in a build of shared libraries, the dynamic linker picks the first definition), so
// a count of zero means something.
inline bool CountingNewIsBound() {
  StartCountingNew();
  ::operator delete(::operator new(16));  // (a direct call, which the compiler may not elide)
  return StopCountingNew() >= 1;          // (another thread may allocate meanwhile)
}
}  // namespace dmoe

#endif  // DMOE_TESTS_COUNTING_NEW_H_

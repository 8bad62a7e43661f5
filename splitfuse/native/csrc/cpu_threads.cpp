// Pins OpenMP threads to CPUs (module splitfuse.native._cpu_threads), as vLLM's
// VLLM_CPU_OMP_THREADS_BIND does: OpenMP thread i of the pool shared with torch runs on cpus[i] only.
//   bind(cpus: tuple of ints)  -> None; raises OSError if the kernel refuses a CPU
//   affinity()                 -> one tuple of allowed CPUs per OpenMP thread, in thread order

#include "native.h"

#include <omp.h>
#include <sched.h>

#include <cerrno>
#include <vector>

namespace {

using namespace splitfuse_native;

PyObject* py_bind(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("bind", count, 1)) return nullptr;
  PyObject* seq = PySequence_Fast(items[0], "bind: cpus must be a sequence of CPU numbers");
  if (!seq) return nullptr;
  std::vector<int> cpus;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const long cpu = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    if (cpu < 0 || cpu >= CPU_SETSIZE) {
      Py_DECREF(seq);
      if (!failed()) PyErr_Format(PyExc_ValueError, "bind: CPU %ld is outside 0..%d", cpu, CPU_SETSIZE - 1);
      return nullptr;
    }
    cpus.push_back(static_cast<int>(cpu));
  }
  Py_DECREF(seq);
  if (cpus.empty()) {
    PyErr_SetString(PyExc_ValueError, "bind: cpus must name at least one CPU");
    return nullptr;
  }
  const int n = static_cast<int>(cpus.size());
  std::vector<int> errors(n, 0);
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(n)
  {
    const int t = omp_get_thread_num();
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpus[t], &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) errors[t] = errno;
  }
  Py_END_ALLOW_THREADS
  for (int t = 0; t < n; ++t) {
    if (errors[t]) {
      errno = errors[t];
      return PyErr_Format(PyExc_OSError, "bind: cannot pin OpenMP thread %d to CPU %d: %s", t, cpus[t],
                          strerror(errors[t]));
    }
  }
  Py_RETURN_NONE;
}

PyObject* py_affinity(PyObject*, PyObject* const*, Py_ssize_t count) {
  if (!check_arity("affinity", count, 0)) return nullptr;
  std::vector<cpu_set_t> sets;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
  {
#pragma omp single
    sets.resize(omp_get_num_threads());
    sched_getaffinity(0, sizeof(cpu_set_t), &sets[omp_get_thread_num()]);
  }
  Py_END_ALLOW_THREADS
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(sets.size()));
  for (size_t t = 0; result && t < sets.size(); ++t) {
    PyObject* cpus = PyList_New(0);
    for (int cpu = 0; cpus && cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &sets[t])) continue;
      PyObject* number = PyLong_FromLong(cpu);
      if (!number || PyList_Append(cpus, number) < 0) Py_CLEAR(cpus);
      Py_XDECREF(number);
    }
    if (!cpus) {
      Py_CLEAR(result);
      break;
    }
    PyTuple_SET_ITEM(result, t, PyList_AsTuple(cpus));
    Py_DECREF(cpus);
  }
  return result;
}

PyMethodDef methods[] = {
    {"bind", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_bind)), METH_FASTCALL,
     "Pin OpenMP thread i to cpus[i] (the pool runs len(cpus) threads)."},
    {"affinity", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_affinity)), METH_FASTCALL,
     "The CPUs each OpenMP thread may run on."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(cpu_threads, methods)

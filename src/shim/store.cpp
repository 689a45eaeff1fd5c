// libtorch's own c10d TCPStore, so that dmdpipe rendezvous through the store torchrun's agent
// already serves (TORCHELASTIC_USE_AGENT_STORE=True) and serves one itself otherwise: the same
// wire protocol as PyTorch's workers, whatever its version. Errors are reported as strings.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {
thread_local std::string store_error;

template <typename F>
int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    store_error = e.what();
    return 1;
  }
}
}  // namespace

extern "C" {

const char* dmd_store_last_error() { return store_error.c_str(); }

// Opens a store at host:port: its server (is_server, waiting for nothing) or a client. Keys are
// prefixed with `prefix` (torch's PrefixStore). Returns an owned handle, or null on failure.
void* dmd_store_open(const char* host, int port, int is_server, const char* prefix, long timeout_ms) {
  c10::intrusive_ptr<c10d::Store>* out = nullptr;
  int rc = guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store = tcp;
    if (prefix != nullptr && prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    }
    out = new c10::intrusive_ptr<c10d::Store>(store);
  });
  return rc == 0 ? out : nullptr;
}

void dmd_store_close(void* handle) { delete static_cast<c10::intrusive_ptr<c10d::Store>*>(handle); }

// The port a store listens on (a server opened with port 0 picks one).
int dmd_store_port(void* handle) {
  auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(handle);
  c10d::Store* base = s.get();
  if (auto* p = dynamic_cast<c10d::PrefixStore*>(base)) base = p->getUnderlyingNonPrefixStore().get();
  auto* tcp = dynamic_cast<c10d::TCPStore*>(base);
  return tcp == nullptr ? -1 : tcp->getPort();
}

int dmd_store_set(void* handle, const char* key, const unsigned char* data, long len) {
  return guarded([&] {
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(handle);
    s->set(std::string(key), std::vector<uint8_t>(data, data + len));
  });
}

// Waits for `key` (up to the store's timeout) and copies its value into buf (at most cap bytes);
// *len gets the value's full length.
int dmd_store_get(void* handle, const char* key, unsigned char* buf, long cap, long* len) {
  return guarded([&] {
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(handle);
    std::vector<uint8_t> v = s->get(std::string(key));
    *len = static_cast<long>(v.size());
    std::memcpy(buf, v.data(), std::min<size_t>(v.size(), static_cast<size_t>(cap)));
  });
}

int dmd_store_set_timeout(void* handle, long timeout_ms) {
  return guarded([&] {
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(handle);
    s->setTimeout(std::chrono::milliseconds(timeout_ms));
  });
}

int dmd_store_add(void* handle, const char* key, long delta, long* value) {
  return guarded([&] {
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(handle);
    *value = s->add(std::string(key), delta);
  });
}

}  // extern "C"

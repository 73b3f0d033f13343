// edgerun's native gRPC front end: gRPC's C++ server reads and writes the calls, Python answers them.
//
// The server takes every call of the service generically (method name and message bytes): HTTP/2, framing,
// flow control and TLS stay in C++ on one completion-queue thread. What Python must see is queued as an event,
// and a non-blocking eventfd tells the event loop there is something to take: the loop reads the events in
// batches (`take_events`) and answers with `finish` (a unary call) or `write` (a message of a stream). Answers
// are queued the other way: an alarm set in the past wakes the completion-queue thread, which starts the writes.
// So every gRPC operation starts on that one thread (no lock inside gRPC is fought over), a call costs Python
// one parse, its work and one serialization, and no thread of Python's waits on gRPC.
//
// Calls are known to Python by a number. A call is freed once gRPC reports it done and no operation on it is
// in flight; an answer for a call already gone (the client cancelled it) is dropped. One mutex guards the two
// queues and the calls' state; the event loop holds it only to swap a queue.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <absl/synchronization/mutex.h>
#include <structmember.h>

#include <grpcpp/alarm.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

enum EventKind { EV_CALL = 0, EV_MESSAGE = 1, EV_END = 2, EV_CANCELLED = 3 };
enum Op { OP_NEW, OP_READ, OP_WRITE, OP_FINISH, OP_DONE, OP_ALARM };

struct Call;
class Server;

struct Tag {
  Call* call;
  Op op;
};

struct Event {
  int kind;
  uint64_t id;
  int method;
  bool has_auth;
  std::string auth;
  bool has_payload;
  grpc::ByteBuffer payload;
};

// An answer from Python, waiting for the completion-queue thread to send it.
struct Answer {
  uint64_t id;
  bool finish;  // a call's last word (else one message of a stream)
  int code;
  std::string message;
  bool has_payload;
  grpc::ByteBuffer payload;
};

struct Call {
  Call() : stream(&ctx) {}
  uint64_t id = 0;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream;
  Tag new_tag{this, OP_NEW}, read_tag{this, OP_READ}, write_tag{this, OP_WRITE}, finish_tag{this, OP_FINISH},
      done_tag{this, OP_DONE};
  grpc::ByteBuffer read_buf;
  int method = -1;
  bool streaming = false;
  int outstanding = 0;      // reads, writes and finishes in flight
  bool done = false;        // gRPC reported the call done
  bool finished = false;    // Python's last word is in (a unary answer, or a stream's status)
  bool finish_sent = false;
  bool writing = false;
  bool read_closed = false;
  bool paused = false;      // a stream waits for answers before reading more
  int unanswered = 0;       // stream messages handed to Python and not yet answered
  std::deque<grpc::ByteBuffer> writes;
  grpc::Status final_status;
};

grpc::ByteBuffer to_buffer(const char* data, Py_ssize_t size) {
  grpc::Slice slice(data, static_cast<size_t>(size));
  return grpc::ByteBuffer(&slice, 1);
}

class Server {
 public:
  // With at most this many calls open, an answer is sent from the event loop's thread when the completion-queue
  // thread is idle (lower latency); with more, answers are left to that thread, which sends them in bursts.
  static constexpr size_t kSendHere = 2;
  // The most completions the completion-queue thread handles before it wakes the event loop for their events.
  static constexpr int kBurst = 64;
  // The completion-queue thread is SCHED_BATCH from kBusy calls open until they are down to kCalm (see Pace).
  static constexpr size_t kBusy = 4;
  static constexpr size_t kCalm = 1;

  Server(std::vector<std::string> methods, std::vector<bool> streaming, int stream_limit)
      : methods_(std::move(methods)), streaming_(std::move(streaming)), stream_limit_(stream_limit) {}

  ~Server() {
    if (event_fd_ >= 0) close(event_fd_);
  }

  // Binds and starts; returns the port bound (0: could not listen).
  int Start(const std::string& address, std::shared_ptr<grpc::ServerCredentials> creds, int max_receive,
            int max_streams, int idle_ms) {
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) return -1;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address, creds, &port);
    builder.RegisterAsyncGenericService(&generic_);
    builder.SetMaxReceiveMessageSize(max_receive);
    builder.SetMaxSendMessageSize(-1);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, max_streams);
    if (idle_ms > 0) builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, idle_ms);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
    cq_ = builder.AddCompletionQueue();
    server_ = builder.BuildAndStart();
    if (!server_ || port == 0) {
      server_.reset();
      cq_->Shutdown();
      void* tag;
      bool ok;
      while (cq_->Next(&tag, &ok)) {
      }
      return 0;
    }
    RequestCall();
    thread_ = std::thread([this] { Poll(); });
    return port;
  }

  // Refuses new calls, cancels those still open after `grace` seconds, and waits for the thread to end.
  void Stop(double grace) {
    if (!server_) return;
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(grace * 1e6));
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    server_->Shutdown(deadline);
    {
      std::lock_guard<std::mutex> lock(mu_);  // no operation may start once the queue is shut down
      cq_closed_ = true;
    }
    cq_->Shutdown();
    thread_.join();
    server_.reset();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& entry : calls_) delete entry.second;
    calls_.clear();
    closed_ = true;
    Signal();
  }

  int event_fd() const { return event_fd_; }

  // Every queued event; `*closed` is set once the server has stopped and nothing is left.
  std::deque<Event> Take(bool* closed) {
    uint64_t value;  // one read takes the whole count (the eventfd is not a semaphore)
    ssize_t n = read(event_fd_, &value, sizeof value);
    (void)n;
    std::lock_guard<std::mutex> lock(mu_);
    std::deque<Event> out;
    out.swap(events_);
    signalled_ = false;
    *closed = closed_ && out.empty();
    return out;
  }

  // Queues a unary call's answer (payload, or an error status), or a stream's final status. False: stopped.
  bool Finish(uint64_t id, int code, std::string message, const char* data, Py_ssize_t size, bool has_payload) {
    Answer a{id, true, code, std::move(message), has_payload, {}};
    if (has_payload) a.payload = to_buffer(data, size);
    return Queue(std::move(a));
  }

  // Queues one answer on a stream, to be sent after those before it. False: stopped.
  bool Write(uint64_t id, const char* data, Py_ssize_t size) {
    return Queue(Answer{id, false, 0, {}, true, to_buffer(data, size)});
  }

 private:
  bool Queue(Answer a) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cq_closed_) return false;
    if (answers_.empty() && calls_.size() <= kSendHere && idle_.load(std::memory_order_acquire)) {
      Send(a);  // one call or two at a time, and the thread waits for work: sending from here saves waking it
      return true;
    }
    answers_.push_back(std::move(a));
    if (!alarm_set_) {  // wake the completion-queue thread (an alarm in the past fires at once, on no timer)
      alarm_set_ = true;
      alarm_.Set(cq_.get(), gpr_inf_past(GPR_CLOCK_MONOTONIC), &alarm_tag_);
    }
    return true;
  }

  // Sends what Python answered (mu_ held, on the completion-queue thread).
  void SendAnswers() {
    alarm_set_ = false;
    std::deque<Answer> answers;
    answers.swap(answers_);
    for (auto& a : answers) Send(a);
  }

  // Starts sending one answer (mu_ held).
  void Send(Answer& a) {
    Call* c = Find(a.id);
    if (c == nullptr || c->finished) return;  // gone: cancelled, or its deadline passed
    if (a.finish) {
      c->finished = true;
      c->final_status = grpc::Status(static_cast<grpc::StatusCode>(a.code), std::move(a.message));
      if (!c->streaming && a.has_payload && a.code == 0) {
        if (cq_closed_) return;
        c->finish_sent = true;
        ++c->outstanding;
        c->stream.WriteAndFinish(a.payload, grpc::WriteOptions(), c->final_status, &c->finish_tag);
      } else if (!c->writing) {
        SendFinish(c);
      }
    } else if (c->streaming) {
      --c->unanswered;
      if (c->paused && c->unanswered < stream_limit_) {
        c->paused = false;
        StartRead(c);
      }
      if (c->writing) {
        c->writes.push_back(std::move(a.payload));
      } else if (!cq_closed_) {
        c->writing = true;
        ++c->outstanding;
        c->stream.Write(a.payload, &c->write_tag);
      }
    }
    MaybeFree(c);
  }

  void MaybeFree(Call* c) {
    if (c->done && c->outstanding == 0) {
      calls_.erase(c->id);
      open_.store(calls_.size(), std::memory_order_relaxed);
      delete c;
    }
  }

  void RequestCall() {
    Call* c = new Call();
    c->ctx.AsyncNotifyWhenDone(&c->done_tag);
    generic_.RequestCall(&c->ctx, &c->stream, cq_.get(), cq_.get(), &c->new_tag);
  }

  void Poll() {
    pthread_setname_np(pthread_self(), "edgerun-grpc");  // as top -H and /proc/<pid>/task/*/comm show it
    void* tag;
    bool ok;
    int handled = 0;  // completions handled since the event loop was last woken
    for (;;) {
      // What is ready is handled before the event loop is woken for the events it queued, so a burst of calls
      // reaches Python in one take_events (and one context switch) instead of one wake per call; a wake is not
      // held back longer than kBurst completions.
      auto status = cq_->AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC));
      if (status == grpc::CompletionQueue::SHUTDOWN) break;
      if (status == grpc::CompletionQueue::TIMEOUT || handled >= kBurst) {
        Wake();
        handled = 0;
      }
      if (status == grpc::CompletionQueue::TIMEOUT) {
        idle_.store(true, std::memory_order_release);
        bool more = cq_->Next(&tag, &ok);
        idle_.store(false, std::memory_order_release);
        if (!more) break;
      }
      ++handled;
      Tag* t = static_cast<Tag*>(tag);
      if (t->op == OP_ALARM) {
        std::lock_guard<std::mutex> lock(mu_);
        SendAnswers();
      } else {
        Handle(t->call, t->op, ok);
      }
      Pace(open_.load(std::memory_order_relaxed));
    }
    Wake();
  }

  // This thread's scheduling policy, by the calls open. Under load it is SCHED_BATCH: it keeps its share of the
  // CPU but does not preempt the event loop each time a packet wakes it, so on one core it reads a burst of calls
  // per turn instead of one per context switch (MLP on one core, alternating h2load runs: 1.3x the calls/s at 8
  // at a time, 1.15x at 32). With few calls open it is an ordinary thread: a SCHED_BATCH thread woken while any
  // other process has the CPU (a nice 19 one included) waits for the scheduler's tick, milliseconds, so one call
  // at a time on a device doing other work went from 3,100 to 520 calls/s.
  void Pace(size_t open) {
    bool batch = batch_ ? open > kCalm : open >= kBusy;
    if (batch == batch_) return;
    batch_ = batch;
    struct sched_param param;
    param.sched_priority = 0;
    pthread_setschedparam(pthread_self(), batch ? SCHED_BATCH : SCHED_OTHER, &param);
  }

  void Handle(Call* c, Op op, bool ok) {
    std::unique_lock<std::mutex> lock(mu_);
    switch (op) {
      case OP_NEW: {
        if (!ok) {  // the server is shutting down: this call never started
          lock.unlock();
          delete c;
          return;
        }
        if (!stopping_) RequestCall();
        c->id = next_id_++;
        calls_[c->id] = c;
        open_.store(calls_.size(), std::memory_order_relaxed);
        const std::string& name = c->ctx.method();
        for (size_t i = 0; i < methods_.size(); ++i) {
          if (methods_[i] == name) {
            c->method = static_cast<int>(i);
            c->streaming = streaming_[i];
            break;
          }
        }
        if (c->method < 0) {
          c->finished = true;
          c->final_status = grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "Method not found: " + name);
          SendFinish(c);
          return;
        }
        if (c->streaming) Post(c, EV_CALL, nullptr);
        StartRead(c);
        return;
      }
      case OP_READ:
        --c->outstanding;
        if (ok) {
          if (c->streaming) {
            Post(c, EV_MESSAGE, &c->read_buf);
            if (++c->unanswered < stream_limit_) {
              StartRead(c);
            } else {
              c->paused = true;
            }
          } else {
            Post(c, EV_CALL, &c->read_buf);
          }
        } else if (c->streaming) {
          c->read_closed = true;
          Post(c, EV_END, nullptr);
        } else if (!c->finished) {  // a unary call that carried no request message
          c->finished = true;
          c->final_status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the call carried no request message");
          SendFinish(c);
        }
        break;
      case OP_WRITE:
        --c->outstanding;
        c->writing = false;
        if (!ok || cq_closed_) {
          c->writes.clear();
        } else if (!c->writes.empty()) {
          c->writing = true;
          ++c->outstanding;
          c->stream.Write(c->writes.front(), &c->write_tag);
          c->writes.pop_front();
          break;
        }
        if (c->finished && !c->finish_sent) SendFinish(c);
        break;
      case OP_FINISH:
        --c->outstanding;
        break;
      case OP_DONE:
        c->done = true;
        if (c->ctx.IsCancelled() && !c->finish_sent && c->method >= 0) Post(c, EV_CANCELLED, nullptr);
        break;
    }
    MaybeFree(c);
  }

  void StartRead(Call* c) {
    if (c->read_closed || c->done || cq_closed_) return;
    ++c->outstanding;
    c->stream.Read(&c->read_buf, &c->read_tag);
  }

  void SendFinish(Call* c) {
    if (cq_closed_) return;
    c->finish_sent = true;
    ++c->outstanding;
    c->stream.Finish(c->final_status, &c->finish_tag);
  }

  Call* Find(uint64_t id) {
    auto it = calls_.find(id);
    return it == calls_.end() ? nullptr : it->second;
  }

  // Queues an event for Python (mu_ held); the first event since the last Take wakes the event loop once mu_ is
  // let go (see Wake).
  void Post(Call* c, int kind, grpc::ByteBuffer* payload) {
    Event e;
    e.kind = kind;
    e.id = c->id;
    e.method = c->method;
    e.has_auth = false;
    e.has_payload = payload != nullptr;
    if (payload != nullptr) e.payload.Swap(payload);
    if (kind == EV_CALL) {
      auto range = c->ctx.client_metadata().equal_range("authorization");
      if (range.first != range.second) {
        e.has_auth = true;
        e.auth.assign(range.first->second.data(), range.first->second.size());
      }
    }
    events_.push_back(std::move(e));
    if (!signalled_) {
      signalled_ = true;
      wake_ = true;
    }
  }

  // Wakes the event loop for what Post queued (on the completion-queue thread, mu_ not held). Woken while this
  // thread still held mu_, the loop would run at once, block on mu_ in take_events and hand the CPU back: two
  // more context switches per wake on one core.
  void Wake() {
    if (!wake_) return;
    wake_ = false;
    uint64_t one = 1;
    ssize_t n = write(event_fd_, &one, sizeof one);
    (void)n;
  }

  // Wakes the event loop now (mu_ held; for the end, not the many events of a running server).
  void Signal() {
    if (signalled_) return;
    signalled_ = true;
    uint64_t one = 1;
    ssize_t n = write(event_fd_, &one, sizeof one);
    (void)n;
  }

  std::vector<std::string> methods_;
  std::vector<bool> streaming_;
  int stream_limit_;
  grpc::AsyncGenericService generic_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread thread_;  // the one completion-queue thread: idle_ and kSendHere count on there being one
  std::mutex mu_;
  std::unordered_map<uint64_t, Call*> calls_;
  std::deque<Event> events_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  bool closed_ = false;
  bool cq_closed_ = false;
  std::deque<Answer> answers_;
  grpc::Alarm alarm_;
  bool alarm_set_ = false;
  std::atomic<bool> idle_{false};  // the completion-queue thread waits in Next
  Tag alarm_tag_{nullptr, OP_ALARM};
  bool signalled_ = false;
  bool wake_ = false;  // Post asked for a wake that Wake has not made yet (the completion-queue thread's alone)
  bool batch_ = false;  // the completion-queue thread is SCHED_BATCH (the thread's alone)
  std::atomic<size_t> open_{0};  // calls_.size(), for Pace without mu_
  int event_fd_ = -1;
};

// --- the Python type ------------------------------------------------------------------------------------

struct ServerObject {
  PyObject_HEAD
  Server* server;
  PyObject* method_names;  // tuple of str, indexed like the C++ table
  int port;
};

PyObject* buffer_to_bytes(grpc::ByteBuffer& buf) {
  std::vector<grpc::Slice> slices;
  if (!buf.Dump(&slices).ok()) {
    PyErr_SetString(PyExc_RuntimeError, "could not read a gRPC message");
    return nullptr;
  }
  size_t total = 0;
  for (auto& s : slices) total += s.size();
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total));
  if (out == nullptr) return nullptr;
  char* dst = PyBytes_AS_STRING(out);
  for (auto& s : slices) {
    std::memcpy(dst, s.begin(), s.size());
    dst += s.size();
  }
  return out;
}

int Server_init(ServerObject* self, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"address", "methods", "streaming", "max_receive", "max_streams", "stream_limit",
                             "key",     "cert",    "client_ca", "idle_ms",    nullptr};
  const char* address;
  PyObject* methods;
  PyObject* streaming;
  int max_receive, max_streams, stream_limit;
  PyObject *key = Py_None, *cert = Py_None, *client_ca = Py_None;
  int idle_ms = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOOiii|OOOi", const_cast<char**>(kw), &address, &methods,
                                   &streaming, &max_receive, &max_streams, &stream_limit, &key, &cert,
                                   &client_ca, &idle_ms))
    return -1;
  PyObject* names = PySequence_Tuple(methods);
  if (names == nullptr) return -1;
  std::vector<std::string> table;
  std::vector<bool> streams;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); ++i) {
    const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, i));
    if (name == nullptr) {
      Py_DECREF(names);
      return -1;
    }
    table.emplace_back(name);
    int is_stream = PySequence_Contains(streaming, PyTuple_GET_ITEM(names, i));
    if (is_stream < 0) {
      Py_DECREF(names);
      return -1;
    }
    streams.push_back(is_stream == 1);
  }
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (key != Py_None) {
    grpc::SslServerCredentialsOptions options;
    const char *k = PyBytes_AsString(key), *c = PyBytes_AsString(cert);
    if (k == nullptr || c == nullptr) {
      Py_DECREF(names);
      return -1;
    }
    options.pem_key_cert_pairs.push_back({k, c});
    if (client_ca != Py_None) {
      const char* ca = PyBytes_AsString(client_ca);
      if (ca == nullptr) {
        Py_DECREF(names);
        return -1;
      }
      options.pem_root_certs = ca;
      options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    creds = grpc::SslServerCredentials(options);
  } else {
    creds = grpc::InsecureServerCredentials();
  }
  auto* server = new Server(std::move(table), std::move(streams), stream_limit);
  int port;
  std::string where(address);
  Py_BEGIN_ALLOW_THREADS port = server->Start(where, creds, max_receive, max_streams, idle_ms);
  Py_END_ALLOW_THREADS if (port <= 0) {
    delete server;
    Py_DECREF(names);
    PyErr_Format(PyExc_OSError, "cannot listen for gRPC on %s", address);
    return -1;
  }
  self->server = server;
  Py_XSETREF(self->method_names, names);
  self->port = port;
  return 0;
}

void Server_dealloc(ServerObject* self) {
  if (self->server != nullptr) {
    Py_BEGIN_ALLOW_THREADS self->server->Stop(0);
    Py_END_ALLOW_THREADS delete self->server;
  }
  Py_XDECREF(self->method_names);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

bool check_open(ServerObject* self) {
  if (self->server == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the gRPC server is closed");
    return false;
  }
  return true;
}

PyObject* Server_fileno(ServerObject* self, PyObject*) {
  if (!check_open(self)) return nullptr;
  return PyLong_FromLong(self->server->event_fd());
}

// take_events() -> list of (kind, call, method, authorization, payload), or None once stopped and drained.
PyObject* Server_take_events(ServerObject* self, PyObject*) {
  if (!check_open(self)) return nullptr;
  bool closed = false;
  std::deque<Event> events = self->server->Take(&closed);
  if (closed) Py_RETURN_NONE;
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(events.size()));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  for (auto& e : events) {
    PyObject* auth;
    if (e.has_auth) {
      auth = PyUnicode_DecodeLatin1(e.auth.data(), static_cast<Py_ssize_t>(e.auth.size()), nullptr);
    } else {
      auth = Py_NewRef(Py_None);
    }
    PyObject* payload = e.has_payload ? buffer_to_bytes(e.payload) : Py_NewRef(Py_None);
    if (auth == nullptr || payload == nullptr) {
      Py_XDECREF(auth);
      Py_XDECREF(payload);
      Py_DECREF(out);
      return nullptr;
    }
    PyObject* method = e.method >= 0 ? PyTuple_GET_ITEM(self->method_names, e.method) : Py_None;
    PyObject* item = Py_BuildValue("(iKONN)", e.kind, static_cast<unsigned long long>(e.id), method, auth, payload);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i++, item);
  }
  return out;
}

// The checks finish and write share: an open server, `expected` arguments, the call number first.
bool call_args(ServerObject* self, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expected, const char* usage,
               unsigned long long* id) {
  if (!check_open(self)) return false;
  if (nargs != expected) {
    PyErr_SetString(PyExc_TypeError, usage);
    return false;
  }
  *id = PyLong_AsUnsignedLongLong(args[0]);
  return !PyErr_Occurred();
}

// finish(call, code, message, payload=None) -> bool
PyObject* Server_finish(ServerObject* self, PyObject* const* args, Py_ssize_t nargs) {
  unsigned long long id;
  if (!call_args(self, args, nargs, 4, "finish(call, code, message, payload)", &id)) return nullptr;
  long code = PyLong_AsLong(args[1]);
  if (PyErr_Occurred()) return nullptr;
  std::string message;
  if (args[2] != Py_None) {
    Py_ssize_t n;
    const char* m = PyUnicode_AsUTF8AndSize(args[2], &n);
    if (m == nullptr) return nullptr;
    message.assign(m, static_cast<size_t>(n));
  }
  const char* data = nullptr;
  Py_ssize_t size = 0;
  bool has_payload = args[3] != Py_None;
  if (has_payload && PyBytes_AsStringAndSize(args[3], const_cast<char**>(&data), &size) < 0) return nullptr;
  bool ok = self->server->Finish(id, static_cast<int>(code), std::move(message), data, size, has_payload);
  return PyBool_FromLong(ok);
}

// write(call, payload) -> bool
PyObject* Server_write(ServerObject* self, PyObject* const* args, Py_ssize_t nargs) {
  unsigned long long id;
  if (!call_args(self, args, nargs, 2, "write(call, payload)", &id)) return nullptr;
  const char* data;
  Py_ssize_t size;
  if (PyBytes_AsStringAndSize(args[1], const_cast<char**>(&data), &size) < 0) return nullptr;
  return PyBool_FromLong(self->server->Write(id, data, size));
}

// stop(grace): blocks (without the GIL) until every call has ended, cancelling those open after `grace` s.
PyObject* Server_stop(ServerObject* self, PyObject* arg) {
  if (!check_open(self)) return nullptr;
  double grace = PyFloat_AsDouble(arg);
  if (PyErr_Occurred()) return nullptr;
  Server* server = self->server;
  Py_BEGIN_ALLOW_THREADS server->Stop(grace < 0 ? 0 : grace);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

PyMethodDef Server_methods[] = {
    {"fileno", reinterpret_cast<PyCFunction>(Server_fileno), METH_NOARGS,
     "The eventfd that is readable while events wait."},
    {"take_events", reinterpret_cast<PyCFunction>(Server_take_events), METH_NOARGS,
     "Every waiting event as (kind, call, method, authorization, payload); None once stopped and drained."},
    {"finish", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(Server_finish)), METH_FASTCALL,
     "finish(call, code, message, payload): a unary call's answer or a call's final status."},
    {"write", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(Server_write)), METH_FASTCALL,
     "write(call, payload): one message of a stream's answers."},
    {"stop", reinterpret_cast<PyCFunction>(Server_stop), METH_O,
     "stop(grace): refuse new calls and wait for those open, cancelling them after grace seconds."},
    {nullptr, nullptr, 0, nullptr}};

PyMemberDef Server_members[] = {
    {"port", T_INT, offsetof(ServerObject, port), READONLY, "The port the server listens on."},
    {nullptr, 0, 0, 0, nullptr}};

PyTypeObject ServerType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "edgerun.grpc._native",
                          "gRPC's C++ server under edgerun's gRPC front end.", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
  // gRPC's locks are abseil's, and a build of abseil with its debug checks on (as some distributions ship it)
  // records every lock order and stack trace to look for deadlocks: several microseconds per call, here for no
  // purpose (a release build does not look).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  ServerType.tp_name = "edgerun.grpc._native.Server";
  ServerType.tp_basicsize = sizeof(ServerObject);
  ServerType.tp_flags = Py_TPFLAGS_DEFAULT;
  ServerType.tp_doc = "Server(address, methods, streaming, max_receive, max_streams, stream_limit, "
                      "key=None, cert=None, client_ca=None, idle_ms=0)";
  ServerType.tp_new = PyType_GenericNew;
  ServerType.tp_init = reinterpret_cast<initproc>(Server_init);
  ServerType.tp_dealloc = reinterpret_cast<destructor>(Server_dealloc);
  ServerType.tp_methods = Server_methods;
  ServerType.tp_members = Server_members;
  if (PyType_Ready(&ServerType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "CALL", EV_CALL) < 0 || PyModule_AddIntConstant(m, "MESSAGE", EV_MESSAGE) < 0 ||
      PyModule_AddIntConstant(m, "END", EV_END) < 0 || PyModule_AddIntConstant(m, "CANCELLED", EV_CANCELLED) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  Py_INCREF(&ServerType);
  if (PyModule_AddObject(m, "Server", reinterpret_cast<PyObject*>(&ServerType)) < 0) {
    Py_DECREF(&ServerType);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

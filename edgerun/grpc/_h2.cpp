// edgerun's event-loop gRPC front end: nghttp2 speaks HTTP/2 for one connection, on the event loop's thread.
//
// A `Session` is one connection's HTTP/2 state. The asyncio protocol that owns the socket hands it what it read
// (`receive`) and gets back what the calls need from Python, as events, with the bytes to write (settings and
// window acknowledgements, and the answers the session gives by itself); Python answers a call with `answer`
// (its last word: a message and trailers, or trailers only) or `write` (one message of a stream), each of which
// returns the bytes to write. No thread, no lock, no copy of a request but one: each gRPC message is read out of
// the DATA frames straight into the bytes object Python gets.
//
// What Python sees (tuples of kind, stream id, method path, authorization, payload):
// - CALL: a unary call, once its request is whole (the payload is the one message), or a streaming call, once
//   its headers are in (payload None);
// - MESSAGE: one request message of a streaming call;
// - END: the client has sent the last message of a streaming call;
// - CANCELLED: a call Python has ended before Python's last word (the client reset it, its deadline passed, or
//   the connection went away).
// A compressed message's payload is (grpc-encoding, bytes): Python inflates it or refuses the encoding.
//
// The session answers by itself what never reaches Python: a method the service does not have (UNIMPLEMENTED),
// a request that is not gRPC (HTTP 405 or 415), headers or a message over the size limit (RESOURCE_EXHAUSTED),
// a message that does not fit beside those every session of the process is receiving (UNAVAILABLE: see `held`)
// and a unary call with other than one message (INVALID_ARGUMENT).
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <nghttp2/nghttp2.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

enum Kind { EV_CALL = 0, EV_MESSAGE = 1, EV_END = 2, EV_CANCELLED = 3 };
enum Method { M_UNKNOWN = 0, M_UNARY = 1, M_STREAM = 2 };

const size_t MAX_HEADER_BYTES = 16 << 10;  // a request's headers, as HTTP/2 counts them (32 bytes a field more)
// A message this small is always let in (many of them still hold little): share_held() gives Python's threshold.
size_t g_small = 64 << 10;

// The bytes of the request messages every session of the process is receiving: each is allocated whole when its
// prefix arrives, and counted until it is whole (handed to Python) or dropped. One loop thread runs the sessions.
size_t g_held = 0;
// The request bytes the whole process holds, gRPC's and what Python adds (the HTTP server's bodies): the cell
// share_held() gives, else one of this module's own. server.max_body_total bounds it; the loop thread alone
// reads and writes it.
int64_t g_own_total = 0;
int64_t* g_total = &g_own_total;
Py_buffer g_total_view = {};  // the shared cell's buffer, held while it is shared

PyObject* H2Error;

// One message of an answer, with its 5-byte gRPC prefix, as it is sent: `off` counts what has gone.
struct Chunk {
  PyObject* payload;  // bytes (a reference is held)
  unsigned char prefix[5];
  size_t off;
  size_t len;  // 5 + the payload's length
};

struct Stream {
  int32_t id = 0;
  std::string path, method, content_type, encoding;
  bool has_auth = false;
  std::string auth;
  size_t header_bytes = 0;
  int kind = M_UNKNOWN;
  bool called = false;  // Python has the call (a CALL event)
  bool closed_by_us = false;  // answered by the session itself (so done too): what comes after is dropped
  // the request message being read
  unsigned char head[5];
  size_t head_len = 0;
  PyObject* message = nullptr;
  size_t message_len = 0, message_fill = 0;
  size_t held = 0;  // what this stream adds to g_held
  int messages = 0;
  PyObject* first = nullptr;  // a unary call's message
  // the answer
  std::deque<Chunk> out;
  bool responded = false;  // headers submitted
  bool done = false;  // the last word is given: trailers follow the last message
  int code = 0;
  std::string status_message;
};

struct State {
  std::unordered_map<std::string, int> methods;
  std::unordered_set<Stream*> streams;
  size_t max_message = 0;
  size_t max_held = 0;  // the most the total held may reach with a message over g_small
  PyObject* events = nullptr;  // the list `receive` fills (null outside it)
  std::vector<int32_t> cancelled_late;  // calls closed while no list was open
  std::string out;  // bytes to write, gathered from nghttp2
  bool failed = false;  // a Python error was raised inside a callback
};

struct SessionObject {
  PyObject_HEAD
  nghttp2_session* h2;
  State* st;
};

// --- the answer's frames ----------------------------------------------------------------------------------

void percent_encode(const std::string& in, std::string& out) {
  static const char hex[] = "0123456789ABCDEF";
  for (unsigned char c : in) {
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
}

nghttp2_nv nv(const char* name, const std::string& value) {
  return {reinterpret_cast<uint8_t*>(const_cast<char*>(name)),
          reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), strlen(name), value.size(),
          NGHTTP2_NV_FLAG_NO_COPY_NAME};
}

// grpc-status and grpc-message, as trailers or in a trailers-only answer (nghttp2 copies the values).
void status_fields(Stream* s, std::string& code, std::string& message, std::vector<nghttp2_nv>& fields) {
  code = std::to_string(s->code);
  fields.push_back(nv("grpc-status", code));
  if (!s->status_message.empty()) {
    percent_encode(s->status_message, message);
    fields.push_back(nv("grpc-message", message));
  }
}

const std::string STATUS_200 = "200", GRPC = "application/grpc", ACCEPT = "identity,deflate,gzip";

ssize_t read_answer(nghttp2_session* h2, int32_t id, uint8_t* buf, size_t length, uint32_t* flags,
                    nghttp2_data_source* source, void*) {
  Stream* s = static_cast<Stream*>(source->ptr);
  size_t n = 0;
  while (n < length && !s->out.empty()) {
    Chunk& c = s->out.front();
    if (c.off < 5) {
      size_t k = std::min(5 - c.off, length - n);
      memcpy(buf + n, c.prefix + c.off, k);
      n += k;
      c.off += k;
    }
    if (c.off >= 5 && n < length) {
      size_t k = std::min(c.len - c.off, length - n);
      memcpy(buf + n, PyBytes_AS_STRING(c.payload) + (c.off - 5), k);
      n += k;
      c.off += k;
    }
    if (c.off == c.len) {
      Py_DECREF(c.payload);
      s->out.pop_front();
    }
  }
  if (s->out.empty()) {
    if (s->done) {
      *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
      std::string code, message;
      std::vector<nghttp2_nv> fields;
      status_fields(s, code, message, fields);
      if (nghttp2_submit_trailer(h2, id, fields.data(), fields.size()) != 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
    } else if (n == 0) {
      return NGHTTP2_ERR_DEFERRED;
    }
  }
  return static_cast<ssize_t>(n);
}

// Submit the answer's headers (and with them the trailers, when there is no message: trailers-only).
int respond(nghttp2_session* h2, Stream* s) {
  s->responded = true;
  std::vector<nghttp2_nv> fields = {nv(":status", STATUS_200), nv("content-type", GRPC),
                                    nv("grpc-accept-encoding", ACCEPT)};
  if (s->out.empty() && s->done) {
    std::string code, message;
    status_fields(s, code, message, fields);
    return nghttp2_submit_response(h2, s->id, fields.data(), fields.size(), nullptr);
  }
  nghttp2_data_provider data;
  data.source.ptr = s;
  data.read_callback = read_answer;
  return nghttp2_submit_response(h2, s->id, fields.data(), fields.size(), &data);
}

bool emit(State* st, int kind, Stream* s, PyObject* payload);

// The message a stream was receiving is whole or dropped: its bytes no longer count as held.
void release_held(Stream* s) {
  g_held -= s->held;
  *g_total -= static_cast<int64_t>(s->held);
  s->held = 0;
}

// The session's own answer to a call whose request it cannot take; the rest of the request is dropped. A
// streaming call Python holds is cancelled there (its answers are not sent), and the answers already queued
// go out before the status.
void refuse(nghttp2_session* h2, State* st, Stream* s, int code, const std::string& message) {
  s->closed_by_us = true;
  Py_CLEAR(s->message);
  Py_CLEAR(s->first);
  release_held(s);
  if (s->done) return;
  s->done = true;
  s->code = code;
  s->status_message = message;
  if (s->kind == M_STREAM && s->called) emit(st, EV_CANCELLED, s, nullptr);
  if (s->responded)
    nghttp2_session_resume_data(h2, s->id);
  else
    respond(h2, s);
}

// An HTTP error for a request that is not a gRPC call at all.
void refuse_http(nghttp2_session* h2, Stream* s, const char* status, const std::string& message) {
  s->closed_by_us = s->responded = s->done = true;
  std::string st = status, code = "3", text;
  percent_encode(message, text);
  std::vector<nghttp2_nv> fields = {nv(":status", st), nv("content-type", GRPC), nv("grpc-status", code),
                                    nv("grpc-message", text)};
  nghttp2_submit_response(h2, s->id, fields.data(), fields.size(), nullptr);
}

// --- reading the calls ------------------------------------------------------------------------------------

State* state_of(void* user) { return static_cast<State*>(user); }

bool emit(State* st, int kind, Stream* s, PyObject* payload) {
  // steals `payload` (may be null: None); a cancellation outside `receive` waits for the next one
  if (st->events == nullptr) {
    Py_XDECREF(payload);
    if (kind == EV_CANCELLED) st->cancelled_late.push_back(s->id);
    return true;
  }
  PyObject* path = Py_None;
  PyObject* auth = Py_None;
  Py_INCREF(Py_None);
  Py_INCREF(Py_None);
  if (kind == EV_CALL) {
    Py_DECREF(path);
    path = PyUnicode_DecodeLatin1(s->path.data(), s->path.size(), nullptr);
    if (s->has_auth) {
      Py_DECREF(auth);
      auth = PyUnicode_DecodeLatin1(s->auth.data(), s->auth.size(), nullptr);
    }
  }
  if (payload == nullptr) {
    payload = Py_None;
    Py_INCREF(Py_None);
  }
  PyObject* event = (path && auth) ? PyTuple_New(5) : nullptr;
  if (event == nullptr) {
    Py_XDECREF(path);
    Py_XDECREF(auth);
    Py_DECREF(payload);
    st->failed = true;
    return false;
  }
  PyTuple_SET_ITEM(event, 0, PyLong_FromLong(kind));
  PyTuple_SET_ITEM(event, 1, PyLong_FromLong(s->id));
  PyTuple_SET_ITEM(event, 2, path);
  PyTuple_SET_ITEM(event, 3, auth);
  PyTuple_SET_ITEM(event, 4, payload);
  int rc = PyList_Append(st->events, event);
  Py_DECREF(event);
  if (rc != 0) st->failed = true;
  return rc == 0;
}

int on_begin_headers(nghttp2_session* h2, const nghttp2_frame* frame, void* user) {
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  Stream* s = new Stream();
  s->id = frame->hd.stream_id;
  state_of(user)->streams.insert(s);
  nghttp2_session_set_stream_user_data(h2, s->id, s);
  return 0;
}

bool is(const uint8_t* name, size_t len, const char* want) {
  return len == strlen(want) && memcmp(name, want, len) == 0;
}

int on_header(nghttp2_session* h2, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
              const uint8_t* value, size_t valuelen, uint8_t, void*) {
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  Stream* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id));
  if (s == nullptr) return 0;
  s->header_bytes += namelen + valuelen + 32;
  if (s->header_bytes > MAX_HEADER_BYTES) {
    // the field is dropped, and the call refused once its headers are in; far beyond the limit (CONTINUATION
    // frames without end) the connection is dropped
    return s->header_bytes > 4 * MAX_HEADER_BYTES ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
  }
  const char* v = reinterpret_cast<const char*>(value);
  if (is(name, namelen, ":path")) {
    s->path.assign(v, valuelen);
  } else if (is(name, namelen, ":method")) {
    s->method.assign(v, valuelen);
  } else if (is(name, namelen, "content-type")) {
    s->content_type.assign(v, valuelen);
  } else if (is(name, namelen, "authorization")) {
    s->has_auth = true;
    s->auth.assign(v, valuelen);
  } else if (is(name, namelen, "grpc-encoding")) {
    s->encoding.assign(v, valuelen);
  }
  return 0;
}

void message_done(nghttp2_session* h2, State* st, Stream* s, bool compressed) {
  PyObject* payload = s->message;
  s->message = nullptr;
  s->head_len = 0;
  release_held(s);
  if (compressed) {
    PyObject* pair = Py_BuildValue("(s#N)", s->encoding.data(), (Py_ssize_t)s->encoding.size(), payload);
    if (pair == nullptr) {
      st->failed = true;
      return;
    }
    payload = pair;
  }
  s->messages++;
  if (s->kind == M_STREAM) {
    emit(st, EV_MESSAGE, s, payload);
  } else if (s->messages == 1) {
    s->first = payload;
  } else {
    Py_DECREF(payload);
    refuse(h2, st, s, 3, "a unary call takes one request message; this one sent more");
  }
}

int on_data_chunk(nghttp2_session* h2, uint8_t, int32_t id, const uint8_t* data, size_t len, void* user) {
  State* st = state_of(user);
  Stream* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(h2, id));
  if (s == nullptr || s->closed_by_us || s->kind == M_UNKNOWN) return 0;
  while (len > 0 && !s->closed_by_us && !st->failed) {
    if (s->message == nullptr) {
      size_t k = std::min(len, 5 - s->head_len);
      memcpy(s->head + s->head_len, data, k);
      s->head_len += k;
      data += k;
      len -= k;
      if (s->head_len < 5) break;
      size_t size = (size_t(s->head[1]) << 24) | (size_t(s->head[2]) << 16) | (size_t(s->head[3]) << 8) |
                    size_t(s->head[4]);
      if (s->head[0] > 1) {
        refuse(h2, st, s, 13, "the request message's gRPC prefix has unknown flags");
        break;
      }
      if (s->head[0] == 1 && s->encoding.empty()) {
        refuse(h2, st, s, 13, "a compressed request message without a grpc-encoding header");
        break;
      }
      if (size > st->max_message) {
        refuse(h2, st, s, 8, "the request message is " + std::to_string(size) + " bytes, more than this server's " +
                             "limit of " + std::to_string(st->max_message) + " (server.max_body)");
        break;
      }
      if (size > g_small && static_cast<size_t>(std::max<int64_t>(*g_total, 0)) + size > st->max_held) {
        if (size > st->max_held)
          refuse(h2, st, s, 8, "the request message is " + std::to_string(size) + " bytes, more than the " +
                               std::to_string(st->max_held) + " bytes of requests this server holds at once " +
                               "(server.max_body_total)");
        else
          refuse(h2, st, s, 14, "the server holds the most request bytes it takes at once " +
                                std::string("(server.max_body_total); retry later"));
        break;
      }
      s->message = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
      if (s->message == nullptr) {
        st->failed = true;
        break;
      }
      s->message_len = size;
      s->message_fill = 0;
      if (size > g_small) {
        s->held = size;
        g_held += size;
        *g_total += static_cast<int64_t>(size);
      }
    }
    size_t k = std::min(len, s->message_len - s->message_fill);
    memcpy(PyBytes_AS_STRING(s->message) + s->message_fill, data, k);
    s->message_fill += k;
    data += k;
    len -= k;
    if (s->message_fill == s->message_len) message_done(h2, st, s, s->head[0] == 1);
  }
  return st->failed ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

void request_end(nghttp2_session* h2, State* st, Stream* s) {
  if (s->closed_by_us) return;
  if (s->message != nullptr || s->head_len > 0) {
    refuse(h2, st, s, 13, "the request ended inside a gRPC message");
    return;
  }
  if (s->kind == M_STREAM) {
    emit(st, EV_END, s, nullptr);
    return;
  }
  if (s->messages != 1) {
    refuse(h2, st, s, 3, "a unary call takes one request message; this one sent none");
    return;
  }
  s->called = true;
  PyObject* payload = s->first;
  s->first = nullptr;
  emit(st, EV_CALL, s, payload);
}

int on_frame_recv(nghttp2_session* h2, const nghttp2_frame* frame, void* user) {
  State* st = state_of(user);
  Stream* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(h2, frame->hd.stream_id));
  if (s == nullptr) return 0;
  if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
    if (s->header_bytes > MAX_HEADER_BYTES) {
      refuse(h2, st, s, 8, "the request's headers are " + std::to_string(s->header_bytes) + " bytes (as HTTP/2 " +
                           "counts them), more than this server's limit of " + std::to_string(MAX_HEADER_BYTES));
    } else if (s->method != "POST") {
      refuse_http(h2, s, "405", "gRPC calls are POST requests");
    } else if (s->content_type.compare(0, 16, "application/grpc") != 0 ||
               (s->content_type.size() > 16 && s->content_type[16] != '+' && s->content_type[16] != ';')) {
      refuse_http(h2, s, "415", "a gRPC call's content-type is application/grpc, not '" + s->content_type + "'");
    } else {
      auto m = st->methods.find(s->path);
      if (m == st->methods.end()) {
        refuse(h2, st, s, 12, "this server has no method " + s->path);
      } else {
        s->kind = m->second;
        if (s->kind == M_STREAM) {
          s->called = true;
          emit(st, EV_CALL, s, nullptr);
        }
      }
    }
  }
  if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS) &&
      (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) && s->kind != M_UNKNOWN)
    request_end(h2, st, s);
  return st->failed ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

void free_stream(State* st, Stream* s) {
  release_held(s);
  Py_XDECREF(s->message);
  Py_XDECREF(s->first);
  for (Chunk& c : s->out) Py_DECREF(c.payload);
  st->streams.erase(s);
  delete s;
}

int on_stream_close(nghttp2_session* h2, int32_t id, uint32_t, void* user) {
  State* st = state_of(user);
  Stream* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(h2, id));
  if (s == nullptr) return 0;
  if (s->called && !s->done) emit(st, EV_CANCELLED, s, nullptr);
  nghttp2_session_set_stream_user_data(h2, id, nullptr);
  free_stream(st, s);
  return 0;
}

// --- the Python type --------------------------------------------------------------------------------------

// Everything nghttp2 has to send, gathered into st->out; false (an exception set) on a fatal error.
bool drain(SessionObject* self) {
  for (;;) {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(self->h2, &data);
    if (n < 0) {
      if (!self->st->failed) PyErr_Format(H2Error, "HTTP/2: %s", nghttp2_strerror(static_cast<int>(n)));
      return false;
    }
    if (n == 0) return true;
    self->st->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
  }
}

PyObject* take_out(SessionObject* self) {
  if (!drain(self)) return nullptr;
  State* st = self->st;
  if (st->out.empty()) Py_RETURN_NONE;
  PyObject* out = PyBytes_FromStringAndSize(st->out.data(), static_cast<Py_ssize_t>(st->out.size()));
  st->out.clear();
  return out;
}

int Session_init(SessionObject* self, PyObject* args, PyObject* kwds) {
  static const char* kwlist[] = {"unary",  "streaming", "max_message", "max_streams",
                                 "window", "frame",     "max_held",    nullptr};
  PyObject *unary, *streaming;
  Py_ssize_t max_message, max_streams, window, frame, max_held;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnnnn", const_cast<char**>(kwlist), &unary, &streaming,
                                   &max_message, &max_streams, &window, &frame, &max_held))
    return -1;
  if (self->st != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "a Session is initialised once");
    return -1;
  }
  auto st = new State();
  st->max_message = static_cast<size_t>(max_message);
  st->max_held = static_cast<size_t>(max_held);
  for (auto [paths, kind] : {std::pair{unary, M_UNARY}, std::pair{streaming, M_STREAM}}) {
    PyObject* it = PyObject_GetIter(paths);
    if (it == nullptr) {
      delete st;
      return -1;
    }
    while (PyObject* p = PyIter_Next(it)) {
      Py_ssize_t len;
      const char* s = PyUnicode_AsUTF8AndSize(p, &len);
      if (s != nullptr) st->methods[std::string(s, len)] = kind;
      Py_DECREF(p);
      if (s == nullptr) break;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
      delete st;
      return -1;
    }
  }
  nghttp2_session_callbacks* cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  int rc = nghttp2_session_server_new(&self->h2, cbs, st);
  nghttp2_session_callbacks_del(cbs);
  if (rc != 0) {
    delete st;
    PyErr_Format(H2Error, "HTTP/2: %s", nghttp2_strerror(rc));
    return -1;
  }
  self->st = st;
  nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, static_cast<uint32_t>(max_streams)},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<uint32_t>(window)},
      {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, static_cast<uint32_t>(frame)},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<uint32_t>(MAX_HEADER_BYTES)},
  };
  rc = nghttp2_submit_settings(self->h2, NGHTTP2_FLAG_NONE, settings, 4);
  if (rc == 0) rc = nghttp2_session_set_local_window_size(self->h2, NGHTTP2_FLAG_NONE, 0, static_cast<int32_t>(window));
  if (rc != 0) {
    PyErr_Format(H2Error, "HTTP/2: %s", nghttp2_strerror(rc));
    return -1;
  }
  return 0;
}

void Session_dealloc(SessionObject* self) {
  if (self->h2 != nullptr) nghttp2_session_del(self->h2);
  if (self->st != nullptr) {
    std::vector<Stream*> left(self->st->streams.begin(), self->st->streams.end());
    for (Stream* s : left) free_stream(self->st, s);
    delete self->st;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

bool ready(SessionObject* self) {
  if (self->h2 == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the Session is not initialised");
    return false;
  }
  return true;
}

// receive(buffer, n) -> (events or None, bytes to write or None)
PyObject* Session_receive(SessionObject* self, PyObject* args) {
  Py_buffer buf;
  Py_ssize_t n;
  if (!ready(self) || !PyArg_ParseTuple(args, "y*n", &buf, &n)) return nullptr;
  if (n < 0 || n > buf.len) {
    PyBuffer_Release(&buf);
    PyErr_SetString(PyExc_ValueError, "n is not within the buffer");
    return nullptr;
  }
  State* st = self->st;
  PyObject* events = PyList_New(0);
  if (events == nullptr) {
    PyBuffer_Release(&buf);
    return nullptr;
  }
  st->events = events;
  st->failed = false;
  for (int32_t id : st->cancelled_late) {
    Stream fake;
    fake.id = id;
    emit(st, EV_CANCELLED, &fake, nullptr);
  }
  st->cancelled_late.clear();
  ssize_t rc = st->failed ? 0 : nghttp2_session_mem_recv(self->h2, static_cast<const uint8_t*>(buf.buf), n);
  PyBuffer_Release(&buf);
  st->events = nullptr;
  if (st->failed || rc < 0) {
    Py_DECREF(events);
    if (!st->failed) {
      // a protocol error: what nghttp2 queued (a GOAWAY) goes out with the exception, for the caller to write
      drain(self);
      PyErr_Clear();
      PyObject* out = PyBytes_FromStringAndSize(st->out.data(), static_cast<Py_ssize_t>(st->out.size()));
      st->out.clear();
      PyObject* exc = Py_BuildValue("(sN)", nghttp2_strerror(static_cast<int>(rc)), out);
      if (exc != nullptr) {
        PyErr_SetObject(H2Error, exc);
        Py_DECREF(exc);
      }
    }
    return nullptr;
  }
  PyObject* out = take_out(self);
  if (out == nullptr) {
    Py_DECREF(events);
    return nullptr;
  }
  if (PyList_GET_SIZE(events) == 0) {
    Py_DECREF(events);
    events = Py_None;
    Py_INCREF(Py_None);
  }
  PyObject* result = PyTuple_Pack(2, events, out);
  Py_DECREF(events);
  Py_DECREF(out);
  return result;
}

bool queue_message(Stream* s, PyObject* payload) {
  if (!PyBytes_Check(payload)) {
    PyErr_SetString(PyExc_TypeError, "a message is bytes");
    return false;
  }
  size_t len = static_cast<size_t>(PyBytes_GET_SIZE(payload));
  if (len > 0xffffffffu) {
    PyErr_SetString(PyExc_ValueError, "a gRPC message is at most 4 GiB");
    return false;
  }
  Chunk c;
  c.payload = payload;
  Py_INCREF(payload);
  c.prefix[0] = 0;
  c.prefix[1] = static_cast<unsigned char>(len >> 24);
  c.prefix[2] = static_cast<unsigned char>(len >> 16);
  c.prefix[3] = static_cast<unsigned char>(len >> 8);
  c.prefix[4] = static_cast<unsigned char>(len);
  c.off = 0;
  c.len = len + 5;
  s->out.push_back(c);
  return true;
}

bool submit(SessionObject* self, Stream* s) {
  int rc = s->responded ? nghttp2_session_resume_data(self->h2, s->id) : respond(self->h2, s);
  if (rc != 0 && rc != NGHTTP2_ERR_INVALID_ARGUMENT) {  // invalid argument: the data was not deferred
    PyErr_Format(H2Error, "HTTP/2: %s", nghttp2_strerror(rc));
    return false;
  }
  return true;
}

// answer(stream_id, code, message, payload) -> bytes to write or None: a call's last word
PyObject* Session_answer(SessionObject* self, PyObject* args) {
  int id, code;
  PyObject *message, *payload;
  if (!ready(self) || !PyArg_ParseTuple(args, "iiOO", &id, &code, &message, &payload)) return nullptr;
  Stream* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(self->h2, id));
  if (s != nullptr && !s->done) {  // done: answered, by Python or by the session itself
    if (payload != Py_None && !queue_message(s, payload)) return nullptr;
    s->done = true;
    s->code = code;
    if (message != Py_None) {
      Py_ssize_t len;
      const char* text = PyUnicode_AsUTF8AndSize(message, &len);
      if (text == nullptr) return nullptr;
      s->status_message.assign(text, len);
    }
    if (!submit(self, s)) return nullptr;
  }
  return take_out(self);
}

// write(stream_id, payload) -> bytes to write or None: one message of a streaming call's answer
PyObject* Session_write(SessionObject* self, PyObject* args) {
  int id;
  PyObject* payload;
  if (!ready(self) || !PyArg_ParseTuple(args, "iO", &id, &payload)) return nullptr;
  Stream* s = static_cast<Stream*>(nghttp2_session_get_stream_user_data(self->h2, id));
  if (s != nullptr && !s->done) {  // done: answered, by Python or by the session itself
    if (!queue_message(s, payload) || !submit(self, s)) return nullptr;
  }
  return take_out(self);
}

// goaway(error=0, reason=None) -> bytes to write or None: no new call is taken; those open go on to their end.
// `error` is the HTTP/2 error code, `reason` the GOAWAY's debug text.
PyObject* Session_goaway(SessionObject* self, PyObject* args) {
  unsigned int error = NGHTTP2_NO_ERROR;
  const char* reason = nullptr;
  Py_ssize_t reason_len = 0;
  if (!ready(self) || !PyArg_ParseTuple(args, "|Iz#", &error, &reason, &reason_len)) return nullptr;
  int rc = nghttp2_submit_goaway(self->h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(self->h2),
                                 error, reinterpret_cast<const uint8_t*>(reason), static_cast<size_t>(reason_len));
  if (rc != 0) {
    PyErr_Format(H2Error, "HTTP/2: %s", nghttp2_strerror(rc));
    return nullptr;
  }
  return take_out(self);
}

// send() -> bytes to write or None
PyObject* Session_send(SessionObject* self, PyObject*) {
  if (!ready(self)) return nullptr;
  return take_out(self);
}

// streams() -> (open, heads, bodies): the streams the session holds; of them, those whose request headers are
// still arriving, and those whose request message is (a unary call not yet whole, or a stream's message cut)
PyObject* Session_streams(SessionObject* self, PyObject*) {
  if (!ready(self)) return nullptr;
  Py_ssize_t heads = 0, bodies = 0;
  for (Stream* s : self->st->streams) {
    if (s->closed_by_us) continue;
    if (s->kind == M_UNKNOWN)
      heads++;
    else if (!s->called || s->message != nullptr || s->head_len > 0)
      bodies++;
  }
  return Py_BuildValue("(nnn)", static_cast<Py_ssize_t>(self->st->streams.size()), heads, bodies);
}

// done() -> True once the connection has nothing more to read or write (close it)
PyObject* Session_done(SessionObject* self, PyObject*) {
  if (!ready(self)) return nullptr;
  return PyBool_FromLong(!nghttp2_session_want_read(self->h2) && !nghttp2_session_want_write(self->h2));
}

PyMethodDef Session_methods[] = {
    {"receive", reinterpret_cast<PyCFunction>(Session_receive), METH_VARARGS,
     "receive(buffer, n) -> (events or None, bytes to write or None): the first n bytes of buffer, as read"},
    {"answer", reinterpret_cast<PyCFunction>(Session_answer), METH_VARARGS,
     "answer(stream_id, code, message, payload) -> bytes to write or None: a call's last word"},
    {"write", reinterpret_cast<PyCFunction>(Session_write), METH_VARARGS,
     "write(stream_id, payload) -> bytes to write or None: one message of a streaming call's answer"},
    {"goaway", reinterpret_cast<PyCFunction>(Session_goaway), METH_VARARGS,
     "goaway(error=0, reason=None) -> bytes to write or None: take no new call; those open go on"},
    {"streams", reinterpret_cast<PyCFunction>(Session_streams), METH_NOARGS,
     "streams() -> (open, heads, bodies): the streams held; those whose headers, or message, are arriving"},
    {"send", reinterpret_cast<PyCFunction>(Session_send), METH_NOARGS, "send() -> bytes to write or None"},
    {"done", reinterpret_cast<PyCFunction>(Session_done), METH_NOARGS,
     "done() -> True once the connection has nothing more to read or write"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject SessionType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* held(PyObject*, PyObject*) { return PyLong_FromSize_t(g_held); }

// Count the bytes held in `cell` (a writable buffer of one 8-byte signed integer) from now on, beside the bytes
// others add there, and let a message of up to `small` bytes in whatever is held; what the sessions hold now
// moves with the count.
PyObject* share_held(PyObject*, PyObject* args) {
  PyObject* cell;
  Py_ssize_t small;
  if (!PyArg_ParseTuple(args, "On", &cell, &small)) return nullptr;
  if (small < 0) {
    PyErr_SetString(PyExc_ValueError, "share_held(): small must be 0 or more");
    return nullptr;
  }
  if (g_total_view.obj == cell) {
    g_small = static_cast<size_t>(small);
    Py_RETURN_NONE;
  }
  Py_buffer view;
  if (PyObject_GetBuffer(cell, &view, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) return nullptr;
  const auto size = static_cast<Py_ssize_t>(sizeof(int64_t));
  const bool int64 = view.format != nullptr && (strcmp(view.format, "q") == 0 || strcmp(view.format, "l") == 0);
  if (view.len != size || view.itemsize != size || !int64) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_ValueError, "share_held() takes a writable buffer of one 8-byte signed integer");
    return nullptr;
  }
  *g_total -= static_cast<int64_t>(g_held);
  if (g_total_view.obj != nullptr) PyBuffer_Release(&g_total_view);
  g_total_view = view;
  g_total = static_cast<int64_t*>(view.buf);
  *g_total += static_cast<int64_t>(g_held);
  g_small = static_cast<size_t>(small);
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"held", held, METH_NOARGS, "held() -> the bytes of the request messages the sessions are receiving"},
    {"share_held", share_held, METH_VARARGS,
     "share_held(cell, small) -> None: check server.max_body_total against the count in cell (a writable buffer of "
     "one 8-byte signed integer), keep the sessions' bytes in it too, and always let in a message of up to small "
     "bytes"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "edgerun.grpc._h2",
                      "One HTTP/2 connection's gRPC calls, read and written by nghttp2 on the caller's thread.", -1,
                      module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__h2() {
  SessionType.tp_name = "edgerun.grpc._h2.Session";
  SessionType.tp_basicsize = sizeof(SessionObject);
  SessionType.tp_flags = Py_TPFLAGS_DEFAULT;
  SessionType.tp_doc = "Session(unary, streaming, max_message, max_streams, window, frame, max_held): one "
                       "connection's HTTP/2 state";
  SessionType.tp_new = PyType_GenericNew;
  SessionType.tp_init = reinterpret_cast<initproc>(Session_init);
  SessionType.tp_dealloc = reinterpret_cast<destructor>(Session_dealloc);
  SessionType.tp_methods = Session_methods;
  if (PyType_Ready(&SessionType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  H2Error = PyErr_NewException("edgerun.grpc._h2.H2Error", nullptr, nullptr);
  Py_INCREF(&SessionType);
  if (H2Error == nullptr || PyModule_AddObject(m, "Session", reinterpret_cast<PyObject*>(&SessionType)) < 0 ||
      PyModule_AddObject(m, "H2Error", H2Error) < 0 || PyModule_AddIntConstant(m, "CALL", EV_CALL) < 0 ||
      PyModule_AddIntConstant(m, "MESSAGE", EV_MESSAGE) < 0 || PyModule_AddIntConstant(m, "END", EV_END) < 0 ||
      PyModule_AddIntConstant(m, "CANCELLED", EV_CANCELLED) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

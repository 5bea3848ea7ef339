// maas-oip-fastpath: the router's fast path for Open Inference Protocol ModelInfer calls.
//
// Why C++: a Python grpc.aio hop costs ~0.7 ms and ~450 us of CPU per call on a small machine, more
// than the router's latency budget; this forwarder costs ~0.25 ms. It holds no routing logic of its
// own: the Python router (services/router/fastpath.py) owns the routing table and pushes it here on
// stdin as precomputed lines, and anything those lines do not settle (unknown model, version not
// READY, routing keys, shadow copies, other methods) is forwarded to the Python router unchanged,
// which answers exactly as on its main port. Tensors are never parsed or copied: the request's bytes
// go to Triton with model_version appended (protobuf's last-value-wins merge rule makes that a set).
//
// stdin (tab-separated lines; a snapshot replaces the whole table):
//   begin
//   replicas <addr,addr,...>
//   model <name> <default version|0> <ready versions,...> <split version:weight,...|-|!> <alias=version,...|->
//         <shadow 0|1>          ("!" = a traffic policy with no usable target: the Python router answers)
//   commit
// stdout: "listening <port>" once, then every --stats-interval seconds
//   stats <inflight> (calls it is sending to Triton; the ones it hands to the Python router are counted
//   there) and "requests <model> <version> <route> <grpc code> <count since last report>" lines (route:
//   explicit_version, alias, traffic_policy or default, as maas_router_requests_total labels them),
//   and "durations <count per --duration-buckets bucket, then +Inf, comma-separated> <seconds>" (since
//   the last report) of the calls it sent to Triton (the Python router times the ones it answers).
// stdin closing (the router exited) or SIGTERM/SIGINT: stop accepting, let calls finish, exit.
// Triton's errors are answered as the main port answers them (services/router/triton_errors.py, which
// passes its rules as flags): INTERNAL naming an --input-error-marker becomes INVALID_ARGUMENT,
// NOT_FOUND/UNAVAILABLE starting with --not-serving-marker (Triton does not serve a version the
// router has as READY: it is (re)loading) becomes UNAVAILABLE worded by --not-serving-message, and
// every error message is cut to --max-status-message-bytes like services.shared.errors.bounded.
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

const char kModelInfer[] = "/inference.GRPCInferenceService/ModelInfer";
// Streaming methods cannot be forwarded as one request and one response.
const char* const kStreamingMethods[] = {
    "/inference.GRPCInferenceService/ModelStreamInfer", "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"};
const double kGoldenStep = 0.6180339887498949;  // the Python router's split sequence step

std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  if (text.empty() || text == "-") return parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep)) parts.push_back(part);
  return parts;
}

struct ModelRoutes {
  std::string default_version;           // empty: the Python router answers version-less calls
  std::map<std::string, bool> ready;     // READY version numbers, as strings
  std::map<std::string, std::string> aliases;  // alias -> READY version
  std::vector<std::pair<std::string, long>> split;  // usable targets and weights
  long split_total = 0;
  bool split_unusable = false;
  bool shadow = false;
};

struct Table {
  std::unordered_map<std::string, ModelRoutes> models;
  std::vector<std::string> replicas;
};

// ---- protobuf wire reading over a request's slices (no copy of the tensors) ---------------------
class WireReader {
 public:
  explicit WireReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {}
  bool AtEnd() {
    while (slice_ < slices_.size() && pos_ >= slices_[slice_].size()) { ++slice_; pos_ = 0; }
    return slice_ >= slices_.size();
  }
  bool Byte(uint8_t* out) {
    if (AtEnd()) return false;
    *out = slices_[slice_].begin()[pos_++];
    return true;
  }
  bool Varint(uint64_t* out) {
    *out = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t byte;
      if (!Byte(&byte)) return false;
      *out |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return true;
    }
    return false;
  }
  bool Skip(uint64_t n) {
    while (n > 0) {
      if (AtEnd()) return false;
      uint64_t take = std::min<uint64_t>(n, slices_[slice_].size() - pos_);
      pos_ += take;
      n -= take;
    }
    return true;
  }
  bool Read(uint64_t n, std::string* out) {
    out->clear();
    while (n > 0) {
      if (AtEnd()) return false;
      uint64_t take = std::min<uint64_t>(n, slices_[slice_].size() - pos_);
      out->append(reinterpret_cast<const char*>(slices_[slice_].begin() + pos_), take);
      pos_ += take;
      n -= take;
    }
    return true;
  }

 private:
  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0, pos_ = 0;
};

// model_name (1) and model_version (2) of a ModelInferRequest; false if it does not parse (the
// Python router then answers with the precise INVALID_ARGUMENT).
bool ReadModelRef(const std::vector<grpc::Slice>& slices, std::string* name, std::string* version) {
  WireReader reader(slices);
  while (!reader.AtEnd()) {
    uint64_t key, value;
    if (!reader.Varint(&key)) return false;
    switch (key & 7) {
      case 0: if (!reader.Varint(&value)) return false; break;
      case 1: if (!reader.Skip(8)) return false; break;
      case 5: if (!reader.Skip(4)) return false; break;
      case 2:
        if (!reader.Varint(&value)) return false;
        if ((key >> 3) == 1) { if (!reader.Read(value, name)) return false; }
        else if ((key >> 3) == 2) { if (!reader.Read(value, version)) return false; }
        else if (!reader.Skip(value)) return false;
        break;
      default: return false;
    }
  }
  return true;
}

std::string VersionField(const std::string& version) {
  std::string out(1, static_cast<char>(2 << 3 | 2));
  uint64_t n = version.size();
  do {
    uint8_t byte = n & 0x7f;
    n >>= 7;
    out.push_back(static_cast<char>(n ? byte | 0x80 : byte));
  } while (n);
  return out + version;
}

bool IsNumber(const std::string& text) {
  if (text.empty()) return false;
  for (char c : text) if (c < '0' || c > '9') return false;
  return true;
}

// ---- the forwarder ------------------------------------------------------------------------------
struct Options {
  std::string listen, fallback;
  int max_message_bytes = 64 << 20;
  double default_timeout = 30.0, stats_interval = 1.0, grace = 5.0;
  std::vector<double> duration_buckets;  // upper bounds, ascending (the router's latency histogram's)
  std::vector<std::string> input_error_markers;
  std::string not_serving_marker, not_serving_message;  // {model} {version} {detail} in the message
  size_t max_status_message_bytes = 1024;
  // The Python router's retry budget (services/shared/outlier.py): retries <= ratio x requests +
  // min_retries over the last window seconds; ratio < 0 = no budget.
  double budget_ratio = -1, budget_min_retries = 0, budget_window = 10;
  // TLS (services/shared/tls.py's settings): served on --listen and used towards Triton and the
  // fallback; the files are watched (re-read every --tls-refresh seconds), so rotation needs no restart.
  std::string tls_cert, tls_key, tls_ca, tls_client_auth = "required", tls_server_name;
  unsigned int tls_refresh = 1;
  bool tls() const { return !tls_cert.empty(); }
};

std::shared_ptr<grpc::experimental::FileWatcherCertificateProvider> CertificateFiles(const Options& options) {
  return std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.tls_key, options.tls_cert, options.tls_ca, options.tls_refresh);
}

std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const Options& options) {
  if (!options.tls()) return grpc::InsecureServerCredentials();
  grpc::experimental::TlsServerCredentialsOptions tls(CertificateFiles(options));
  tls.watch_root_certs();
  tls.watch_identity_key_cert_pairs();
  tls.set_cert_request_type(options.tls_client_auth == "required"
                                ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  return grpc::experimental::TlsServerCredentials(tls);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const Options& options) {
  if (!options.tls()) return grpc::InsecureChannelCredentials();
  grpc::experimental::TlsChannelCredentialsOptions tls;
  tls.set_certificate_provider(CertificateFiles(options));
  tls.watch_root_certs();
  tls.watch_identity_key_cert_pairs();
  tls.set_verify_server_certs(true);
  tls.set_certificate_verifier(std::make_shared<grpc::experimental::HostNameCertificateVerifier>());
  return grpc::experimental::TlsCredentials(tls);
}

// services.shared.outlier.RetryBudget: requests and retries counted in one-second buckets.
class RetryBudget {
 public:
  explicit RetryBudget(const Options& options) : options_(options) {}
  void Request() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++Current()[1];
  }
  bool TryRetry() {
    if (options_.budget_ratio < 0) return true;
    std::lock_guard<std::mutex> lock(mutex_);
    std::array<long, 3>& current = Current();
    long requests = 0, retries = 0;
    for (const auto& bucket : buckets_) { requests += bucket[1]; retries += bucket[2]; }
    if (retries + 1 > options_.budget_ratio * requests + options_.budget_min_retries) return false;
    ++current[2];
    return true;
  }

 private:
  std::array<long, 3>& Current() {  // [second, requests, retries]
    long now = std::chrono::duration_cast<std::chrono::seconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
    while (!buckets_.empty() && buckets_.front()[0] <= now - options_.budget_window) buckets_.pop_front();
    if (buckets_.empty() || buckets_.back()[0] != now) buckets_.push_back({now, 0, 0});
    return buckets_.back();
  }
  const Options& options_;
  std::mutex mutex_;
  std::deque<std::array<long, 3>> buckets_;
};

std::string ReplaceAll(std::string text, const std::string& from, const std::string& to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

// services.shared.errors.bounded, byte for byte: the two ports give the same message.
std::string Bounded(const std::string& message, size_t limit) {
  if (message.size() <= limit) return message;
  std::string marker = "\u2026 (" + std::to_string(message.size() - limit) + " more bytes cut)";
  size_t keep = limit > marker.size() + 4 ? limit - marker.size() - 4 : 0;
  while (keep > 0 && (static_cast<unsigned char>(message[keep]) & 0xC0) == 0x80) --keep;  // whole characters
  return message.substr(0, keep) + "\u2026 (" + std::to_string(message.size() - keep) + " more bytes cut)";
}

class Forwarder {
 public:
  explicit Forwarder(const Options& options)
      : budget(options), options_(options), credentials_(ChannelCredentials(options)),
        table_(std::make_shared<Table>()),
        durations_(options.duration_buckets.size() + 1, 0) {
    fallback_ = std::make_unique<grpc::GenericStub>(Connect(options.fallback));
    sequence_rng_.seed(std::random_device{}());
  }

  // Decides where a ModelInfer goes: the Triton version to ask for, or "" = the Python router; *kind
  // is how it was chosen (the Python router's RouteKind names).
  std::string Route(const std::string& name, const std::string& version, const char** kind) {
    std::shared_ptr<Table> table = CurrentTable();
    auto found = table->models.find(name);
    if (found == table->models.end()) return "";
    const ModelRoutes& routes = found->second;
    if (IsNumber(version)) {
      *kind = "explicit_version";
      return routes.ready.count(version) ? version : "";
    }
    if (!version.empty()) {
      *kind = "alias";
      auto alias = routes.aliases.find(version);
      return alias == routes.aliases.end() ? "" : alias->second;
    }
    if (routes.shadow || routes.split_unusable) return "";
    if (routes.split.empty()) {
      *kind = "default";
      return routes.default_version;
    }
    *kind = "traffic_policy";
    double point = NextPoint(name) * routes.split_total;
    for (const auto& [target, weight] : routes.split) {
      point -= weight;
      if (point < 0) return target;
    }
    return routes.split.back().first;
  }

  grpc::GenericStub* Fallback() { return fallback_.get(); }
  const Options& options() const { return options_; }

  void Apply(std::shared_ptr<Table> table) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (table->replicas != table_->replicas) {
      std::map<std::string, std::shared_ptr<grpc::GenericStub>> kept;
      for (size_t i = 0; i < table_->replicas.size(); ++i) kept[table_->replicas[i]] = replica_stubs_[i];
      std::vector<std::shared_ptr<grpc::GenericStub>> stubs;
      for (const std::string& address : table->replicas) {
        auto old = kept.find(address);
        stubs.push_back(old != kept.end() ? old->second : std::make_shared<grpc::GenericStub>(Connect(address)));
      }
      // Calls in flight hold their own reference (see Call::replica_), so dropping ours is safe.
      replica_stubs_ = std::move(stubs);
    }
    table_ = std::move(table);
  }

  // A Triton replica's stub, round robin, skipping `tried` (calls keep it alive); nullptr when none.
  std::shared_ptr<grpc::GenericStub> ReplicaRef(const std::vector<std::shared_ptr<grpc::GenericStub>>& tried = {}) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < replica_stubs_.size(); ++i) {
      const std::shared_ptr<grpc::GenericStub>& stub = replica_stubs_[next_replica_++ % replica_stubs_.size()];
      if (std::find(tried.begin(), tried.end(), stub) == tried.end()) return stub;
    }
    return nullptr;
  }

  void Count(const std::string& model, const std::string& version, const char* route, grpc::StatusCode code,
             double seconds) {
    const std::vector<double>& bounds = options_.duration_buckets;
    size_t bucket = std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin();  // first bound >= seconds
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++counts_[model + "\t" + version + "\t" + route + "\t" + std::to_string(static_cast<int>(code))];
    ++durations_[bucket];
    duration_sum_ += seconds;
  }

  void ReportStats() {
    std::map<std::string, long> counts;
    std::vector<long> durations(durations_.size(), 0);
    double duration_sum = 0;
    {
      std::lock_guard<std::mutex> lock(stats_mutex_);
      counts.swap(counts_);
      durations.swap(durations_);
      std::swap(duration_sum, duration_sum_);
    }
    std::ostringstream out;
    out << "stats\t" << inflight.load() << "\n";
    long refused = budget_refusals.exchange(0);
    if (refused) out << "budget_refusals\t" << refused << "\n";
    for (const auto& [key, count] : counts) out << "requests\t" << key << "\t" << count << "\n";
    if (!counts.empty()) {
      out << "durations\t";
      for (size_t i = 0; i < durations.size(); ++i) out << (i ? "," : "") << durations[i];
      out << "\t" << duration_sum << "\n";
    }
    std::cout << out.str() << std::flush;
  }

  std::atomic<long> inflight{0};
  std::atomic<long> budget_refusals{0};  // reported on the stats line
  RetryBudget budget;

 private:
  std::shared_ptr<grpc::Channel> Connect(const std::string& address) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options_.max_message_bytes);
    args.SetMaxSendMessageSize(options_.max_message_bytes);
    if (!options_.tls_server_name.empty()) args.SetSslTargetNameOverride(options_.tls_server_name);
    return grpc::CreateCustomChannel(address, credentials_, args);
  }

  std::shared_ptr<Table> CurrentTable() {
    std::lock_guard<std::mutex> lock(mutex_);
    return table_;
  }

  // The low-discrepancy sequence the Python router uses with no routing key: a 10% canary gets 10%.
  double NextPoint(const std::string& model) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = sequence_.find(model);
    double point = found != sequence_.end() ? found->second : std::uniform_real_distribution<double>(0, 1)(sequence_rng_);
    point += kGoldenStep;
    if (point >= 1.0) point -= 1.0;
    sequence_[model] = point;
    return point;
  }

  Options options_;
  std::shared_ptr<grpc::ChannelCredentials> credentials_;  // one per process: the watched files are shared
  std::mutex mutex_, stats_mutex_;
  std::shared_ptr<Table> table_;
  std::vector<std::shared_ptr<grpc::GenericStub>> replica_stubs_;
  size_t next_replica_ = 0;
  std::unique_ptr<grpc::GenericStub> fallback_;
  std::unordered_map<std::string, double> sequence_;
  std::mt19937_64 sequence_rng_;
  std::map<std::string, long> counts_;
  std::vector<long> durations_;
  double duration_sum_ = 0;
};

bool ForwardedHeader(const grpc::string_ref& key) {
  static const char* const kSkip[] = {"user-agent", "te", "content-type", "grpc-accept-encoding", "grpc-encoding",
                                      "grpc-timeout", "accept-encoding"};
  if (key.starts_with(":")) return false;
  for (const char* skip : kSkip) if (key == skip) return false;
  return true;
}

// One call: read the request, send it on (to Triton or the Python router), write back what came.
class Call : public grpc::ServerGenericBidiReactor {
 public:
  Call(grpc::GenericCallbackServerContext* context, Forwarder* forwarder)
      : context_(context), forwarder_(forwarder), started_(std::chrono::steady_clock::now()) {
    for (const char* method : kStreamingMethods) {
      if (context_->method() == method) {
        // Streams (ModelStreamInfer of decoupled models included) are the main port's: it routes each request.
        Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                            context_->method() + " is streaming: this fast path forwards unary calls only; "
                                                 "call it on the router's main port"));
        return;
      }
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message received"));
      return;
    }
    bool routing_key = false;
    for (const auto& [key, value] : context_->client_metadata()) {
      if (!ForwardedHeader(key)) continue;
      if (key == "x-maas-routing-key") routing_key = true;
      metadata_.emplace_back(std::string(key.data(), key.size()), std::string(value.data(), value.size()));
    }
    grpc::GenericStub* stub = forwarder_->Fallback();
    outgoing_ = &request_;
    if (context_->method() == kModelInfer && !routing_key) {
      std::vector<grpc::Slice> slices;
      std::string version;
      if (request_.Dump(&slices).ok() && ReadModelRef(slices, &model_, &version)) {
        std::string target = forwarder_->Route(model_, version, &route_);
        if (!target.empty() && (replica_ = forwarder_->ReplicaRef())) {
          ++forwarder_->inflight;  // only here: a call handed to the Python router is counted there
          forwarder_->budget.Request();
          version_ = target;
          if (target != version) {
            slices.emplace_back(VersionField(target));
            retargeted_ = grpc::ByteBuffer(slices.data(), slices.size());
            outgoing_ = &retargeted_;
          }
          stub = replica_.get();
        }
      }
    }
    Send(stub);
  }

  void OnDone() override {
    if (replica_) --forwarder_->inflight;
    delete this;
  }

 private:
  void Send(grpc::GenericStub* stub) {
    upstream_ = grpc::ClientContext::FromCallbackServerContext(*context_);  // deadline + cancellation
    gpr_timespec deadline = context_->raw_deadline();
    if (gpr_time_cmp(deadline, gpr_inf_future(deadline.clock_type)) == 0) {  // the caller set none
      upstream_->set_deadline(std::chrono::system_clock::now() +
                              std::chrono::milliseconds(static_cast<long>(forwarder_->options().default_timeout * 1000)));
    }
    for (const auto& [key, value] : metadata_) upstream_->AddMetadata(key, value);
    stub->UnaryCall(upstream_.get(), context_->method(), grpc::StubOptions(), outgoing_, &response_,
                    [this](grpc::Status status) { Done(status); });
  }

  grpc::Status AsTheMainPort(const grpc::Status& status) {
    if (status.ok()) return status;
    const Options& options = forwarder_->options();
    grpc::StatusCode code = status.error_code();
    std::string message = status.error_message();
    if (code == grpc::StatusCode::INTERNAL) {
      for (const std::string& marker : options.input_error_markers) {
        if (message.find(marker) != std::string::npos) code = grpc::StatusCode::INVALID_ARGUMENT;
      }
    }
    // Only Triton's answers (replica_ set): the Python router's NOT_FOUND is about the registry.
    if (replica_ && !options.not_serving_marker.empty() &&
        (code == grpc::StatusCode::NOT_FOUND || code == grpc::StatusCode::UNAVAILABLE) &&
        message.rfind(options.not_serving_marker, 0) == 0) {
      code = grpc::StatusCode::UNAVAILABLE;
      message = ReplaceAll(ReplaceAll(ReplaceAll(options.not_serving_message, "{model}", model_), "{version}", version_),
                           "{detail}", message);
    }
    return grpc::Status(code, Bounded(message, options.max_status_message_bytes), status.error_details());
  }

  // The Python router's retry rule (services/router/peers.py retry_elsewhere): only a call that
  // provably never ran - it never left (its replica could not be connected to), or Triton refused it
  // for a version that replica does not serve - goes to another replica, once per replica, while the
  // retry budget lasts; anything else may have reached the model.
  bool RetryElsewhere(const grpc::Status& status) {
    if (!replica_) return false;
    const Options& options = forwarder_->options();
    const std::string& message = status.error_message();
    grpc::StatusCode code = status.error_code();
    bool never_sent = code == grpc::StatusCode::UNAVAILABLE && message.rfind("failed to connect to all addresses", 0) == 0;
    bool not_serving = (code == grpc::StatusCode::NOT_FOUND || code == grpc::StatusCode::UNAVAILABLE) &&
                       !options.not_serving_marker.empty() && message.rfind(options.not_serving_marker, 0) == 0;
    if (!never_sent && !not_serving) return false;
    tried_.push_back(replica_);
    std::shared_ptr<grpc::GenericStub> next = forwarder_->ReplicaRef(tried_);
    if (!next) return false;
    if (!never_sent && !forwarder_->budget.TryRetry()) {  // a call that never left costs no Triton anything
      ++forwarder_->budget_refusals;
      budget_spent_ = true;
      return false;
    }
    replica_ = next;
    Send(replica_.get());
    return true;
  }

  void Done(const grpc::Status& received) {
    if (RetryElsewhere(received)) return;
    grpc::Status status = AsTheMainPort(received);
    if (budget_spent_) {  // the main port's words (services/router/peers.py)
      status = grpc::Status(status.error_code(),
                            Bounded(status.error_message() + "; not retried on another replica: the retry budget is spent",
                                    forwarder_->options().max_status_message_bytes), status.error_details());
    }
    if (replica_) {
      std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - started_;
      forwarder_->Count(model_, version_, route_, status.error_code(), elapsed.count());
    }
    if (status.ok()) StartWriteAndFinish(&response_, grpc::WriteOptions(), status);
    else Finish(status);
  }

  grpc::GenericCallbackServerContext* context_;
  Forwarder* forwarder_;
  std::unique_ptr<grpc::ClientContext> upstream_;
  std::vector<std::pair<std::string, std::string>> metadata_;  // the caller's, passed on
  const grpc::ByteBuffer* outgoing_ = nullptr;
  std::shared_ptr<grpc::GenericStub> replica_;
  std::vector<std::shared_ptr<grpc::GenericStub>> tried_;
  bool budget_spent_ = false;
  std::chrono::steady_clock::time_point started_;
  std::string model_, version_;
  const char* route_ = "";
  grpc::ByteBuffer request_, retargeted_, response_;
};

class Service : public grpc::CallbackGenericService {
 public:
  explicit Service(Forwarder* forwarder) : forwarder_(forwarder) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
    return new Call(context, forwarder_);
  }

 private:
  Forwarder* forwarder_;
};

// ---- control: routing snapshots on stdin ---------------------------------------------------------
bool ParseModel(const std::vector<std::string>& fields, std::string* name, ModelRoutes* routes) {
  if (fields.size() != 7) return false;
  *name = fields[1];
  routes->default_version = fields[2] == "0" ? "" : fields[2];
  for (const std::string& version : Split(fields[3], ',')) routes->ready[version] = true;
  if (fields[4] == "!") {
    routes->split_unusable = true;
  } else {
    for (const std::string& target : Split(fields[4], ',')) {
      size_t colon = target.find(':');
      if (colon == std::string::npos) return false;
      long weight = std::atol(target.c_str() + colon + 1);
      routes->split.emplace_back(target.substr(0, colon), weight);
      routes->split_total += weight;
    }
  }
  for (const std::string& alias : Split(fields[5], ',')) {
    size_t eq = alias.find('=');
    if (eq == std::string::npos) return false;
    routes->aliases[alias.substr(0, eq)] = alias.substr(eq + 1);
  }
  routes->shadow = fields[6] == "1";
  return true;
}

void ReadControl(Forwarder* forwarder) {
  std::string line;
  std::shared_ptr<Table> building;
  while (std::getline(std::cin, line)) {
    std::vector<std::string> fields;
    std::stringstream stream(line);
    std::string field;
    while (std::getline(stream, field, '\t')) fields.push_back(field);
    if (fields.empty()) continue;
    if (fields[0] == "begin") {
      building = std::make_shared<Table>();
    } else if (fields[0] == "commit" && building) {
      forwarder->Apply(std::move(building));
      building.reset();
    } else if (fields[0] == "replicas" && building && fields.size() == 2) {
      building->replicas = Split(fields[1], ',');
    } else if (fields[0] == "model" && building) {
      std::string name;
      ModelRoutes routes;
      if (ParseModel(fields, &name, &routes)) building->models[name] = std::move(routes);
      else std::cerr << "maas-oip-fastpath: ignored malformed line: " << line << std::endl;
    } else {
      std::cerr << "maas-oip-fastpath: ignored control line: " << line << std::endl;
    }
  }
}

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

bool ParseArgs(int argc, char** argv, Options* options) {
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--listen") options->listen = value;
    else if (flag == "--fallback") options->fallback = value;
    else if (flag == "--max-message-bytes") options->max_message_bytes = std::atoi(value.c_str());
    else if (flag == "--default-timeout") options->default_timeout = std::atof(value.c_str());
    else if (flag == "--stats-interval") options->stats_interval = std::atof(value.c_str());
    else if (flag == "--grace") options->grace = std::atof(value.c_str());
    else if (flag == "--input-error-marker") options->input_error_markers.push_back(value);
    else if (flag == "--not-serving-marker") options->not_serving_marker = value;
    else if (flag == "--not-serving-message") options->not_serving_message = value;
    else if (flag == "--retry-budget") {  // ratio,min_retries,window_seconds
      std::vector<std::string> parts = Split(value, ',');
      if (parts.size() != 3) return false;
      options->budget_ratio = std::atof(parts[0].c_str());
      options->budget_min_retries = std::atof(parts[1].c_str());
      options->budget_window = std::atof(parts[2].c_str());
    }
    else if (flag == "--max-status-message-bytes") options->max_status_message_bytes = std::atol(value.c_str());
    else if (flag == "--tls-cert") options->tls_cert = value;
    else if (flag == "--tls-key") options->tls_key = value;
    else if (flag == "--tls-ca") options->tls_ca = value;
    else if (flag == "--tls-client-auth") {
      if (value != "required" && value != "optional") return false;
      options->tls_client_auth = value;
    }
    else if (flag == "--tls-server-name") options->tls_server_name = value;
    else if (flag == "--tls-refresh") options->tls_refresh = std::max(1, std::atoi(value.c_str()));
    else if (flag == "--duration-buckets") {
      for (const std::string& bound : Split(value, ',')) options->duration_buckets.push_back(std::atof(bound.c_str()));
      if (!std::is_sorted(options->duration_buckets.begin(), options->duration_buckets.end())) return false;
    }
    else return false;
  }
  bool tls_complete = options->tls_cert.empty() == options->tls_key.empty() &&
                      options->tls_cert.empty() == options->tls_ca.empty();
  return argc % 2 == 1 && !options->listen.empty() && !options->fallback.empty() && tls_complete;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!ParseArgs(argc, argv, &options)) {
    std::cerr << "usage: maas-oip-fastpath --listen HOST:PORT --fallback HOST:PORT [--max-message-bytes N]"
                 " [--default-timeout S] [--stats-interval S] [--grace S] [--duration-buckets S,S,...]"
                 " [--input-error-marker TEXT]... [--not-serving-marker TEXT --not-serving-message TEMPLATE]"
                 " [--max-status-message-bytes N]"
                 " [--tls-cert PEM --tls-key PEM --tls-ca PEM [--tls-client-auth required|optional]"
                 " [--tls-server-name NAME] [--tls-refresh S]]"
                 "  (routing snapshots on stdin)" << std::endl;
    return 2;
  }
  Forwarder forwarder(options);
  Service service(&forwarder);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, ServerCredentials(options), &port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  // gRPC lets several processes share a port by default; a second router must fail, not split traffic.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << "maas-oip-fastpath: could not listen on " << options.listen << std::endl;
    return 1;
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  std::cout << "listening\t" << port << std::endl;
  std::thread control([&forwarder] { ReadControl(&forwarder); g_stop = true; });
  control.detach();  // blocked in a read of stdin; the process exits without joining it
  auto interval = std::chrono::milliseconds(static_cast<long>(options.stats_interval * 1000));
  auto next_report = std::chrono::steady_clock::now() + interval;
  while (!g_stop) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (std::chrono::steady_clock::now() >= next_report) {
      forwarder.ReportStats();
      next_report += interval;
    }
  }
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<long>(options.grace * 1000)));
  forwarder.ReportStats();
  return 0;
}

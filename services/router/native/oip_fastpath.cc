// maas-oip-fastpath: the router's fast path for Open Inference Protocol ModelInfer calls.
//
// Why C++: a Python grpc.aio hop costs ~0.7 ms and ~450 us of CPU per call on a small machine, more
// than the router's latency budget; this forwarder costs ~0.25 ms. It routes by the spec in
// protos/maas/v1/fastpath.proto, the one the Python router follows too (its rules 1-3: version
// choice, replica choice, retry on another replica), and holds no routing constant of its own: the
// Python router (services/router/fastpath.py) computes a FastPathSnapshot from its routing table and
// writes it on stdin (each preceded by its size, 4 bytes big-endian), with the split draw's
// parameters. Anything a snapshot does not settle (unknown model, version not READY, shadow copies,
// other methods) is forwarded to the Python router unchanged, which answers exactly as on its main
// port. Tensors are never parsed or copied: the request's bytes go to Triton with model_version
// appended (protobuf's last-value-wins merge rule makes that a set). tests/fixtures/routing_vectors.json
// holds cases both implementations must answer alike (--check-vectors FILE: a RoutingVectors message).
//
// stdout: "listening <port>" once, then every --stats-interval seconds
//   stats <inflight> (calls it is sending to Triton; the ones it hands to the Python router are counted
//   there) and "requests <model> <version> <route> <grpc code> <count since last report>" lines (route:
//   explicit_version, alias, traffic_policy or default, as maas_router_requests_total labels them),
//   "durations <count per --duration-buckets bucket, then +Inf, comma-separated> <seconds>" (since
//   the last report) of the calls it sent to Triton or refused (the Python router times the ones it
//   answers), and "latencies <model> <version> <count per --version-latency-bounds-ms bucket, then +Inf,
//   comma-separated>" of the calls Triton answered OK, per version (the rollout analysis's p99: the
//   router's services/router/version_stats.py histogram, whose bounds the flag carries);
//   with auth on, "tenant <name> <calls> <cost units>" of the calls it served and
//   "refusals <tenant or empty> <reason> <grpc code> <count>" of the ones it refused (rule 4).
// --require-auth (the router runs with auth on): API keys are checked here by rule 4, against the tenants
// the snapshot carries (sha256 by OpenSSL's libcrypto), refusals worded by the snapshot; until a snapshot
// with tenants arrives every call goes to the Python router.
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

#include <openssl/evp.h>

#include "maas/v1/fastpath.pb.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
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

std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  if (text.empty() || text == "-") return parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep)) parts.push_back(part);
  return parts;
}

struct ModelRoutes {  // a maas.v1.FastPathModel, indexed
  uint32_t default_version = 0;                 // 0: the Python router answers version-less calls
  std::set<uint32_t> ready;                     // READY versions
  std::map<std::string, uint32_t> aliases;      // alias -> READY version
  bool has_policy = false;
  std::vector<uint32_t> split_versions;         // usable targets, in the policy's order
  std::vector<double> split_weights;
};

struct TenantRule {  // a maas.v1.FastPathTenant, indexed
  std::string name, revoked_message, denied_message;
  bool revoked = false, served_here = false;
  std::set<std::string> allowed;  // empty: every model
};

struct AuthRules {  // a maas.v1.FastPathAuth, indexed
  bool synced = false;
  std::unordered_map<std::string, TenantRule> by_key_sha256;  // lower-case hex
  std::string missing_key_message, malformed_key_message, unknown_key_message, priority_metadata, asked_placeholder;
};

struct Table {
  std::unordered_map<std::string, ModelRoutes> models;
  std::vector<std::string> replicas;
  maas::v1::SplitDraw draw;
  std::unique_ptr<AuthRules> auth;  // null: the snapshot has no auth (calls need no key)
};

std::shared_ptr<Table> TableOf(const maas::v1::FastPathSnapshot& snapshot) {
  auto table = std::make_shared<Table>();
  table->replicas.assign(snapshot.replicas().begin(), snapshot.replicas().end());
  table->draw = snapshot.draw();
  for (const maas::v1::FastPathModel& model : snapshot.models()) {
    ModelRoutes& routes = table->models[model.name()];
    routes.default_version = model.default_version();
    routes.ready.insert(model.ready_versions().begin(), model.ready_versions().end());
    routes.aliases.insert(model.aliases().begin(), model.aliases().end());
    routes.has_policy = model.has_policy();
    for (const maas::v1::SplitTarget& target : model.split()) {
      routes.split_versions.push_back(target.version());
      routes.split_weights.push_back(target.weight());
    }
  }
  if (snapshot.has_auth()) {
    const maas::v1::FastPathAuth& auth = snapshot.auth();
    table->auth = std::make_unique<AuthRules>();
    AuthRules& rules = *table->auth;
    rules.synced = auth.synced();
    rules.missing_key_message = auth.missing_key_message();
    rules.malformed_key_message = auth.malformed_key_message();
    rules.unknown_key_message = auth.unknown_key_message();
    rules.priority_metadata = auth.priority_metadata();
    rules.asked_placeholder = auth.asked_placeholder();
    for (const maas::v1::FastPathTenant& tenant : auth.tenants()) {
      TenantRule& rule = rules.by_key_sha256[tenant.key_sha256()];
      rule.name = tenant.name();
      rule.revoked = tenant.revoked();
      rule.revoked_message = tenant.revoked_message();
      rule.denied_message = tenant.denied_message();
      rule.served_here = tenant.served_here();
      rule.allowed.insert(tenant.allowed().begin(), tenant.allowed().end());
    }
  }
  return table;
}

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
    ++consumed_;
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
      consumed_ += take;
      n -= take;
    }
    return true;
  }
  uint64_t Consumed() const { return consumed_; }
  bool Read(uint64_t n, std::string* out) {
    out->clear();
    while (n > 0) {
      if (AtEnd()) return false;
      uint64_t take = std::min<uint64_t>(n, slices_[slice_].size() - pos_);
      out->append(reinterpret_cast<const char*>(slices_[slice_].begin() + pos_), take);
      pos_ += take;
      consumed_ += take;
      n -= take;
    }
    return true;
  }

 private:
  const std::vector<grpc::Slice>& slices_;
  size_t slice_ = 0, pos_ = 0;
  uint64_t consumed_ = 0;
};

// Skips one field's value of wire type `type`; false if it does not parse.
bool SkipField(WireReader& reader, uint64_t type) {
  uint64_t value;
  switch (type) {
    case 0: return reader.Varint(&value);
    case 1: return reader.Skip(8);
    case 5: return reader.Skip(4);
    case 2: return reader.Varint(&value) && reader.Skip(value);
    default: return false;
  }
}

// The batch rows of an InferInputTensor of `size` bytes (its shape's (3) first dimension; 1 without
// one or when it is not positive: services/router/dataplane.py _rows, the cost units of a ModelInfer).
bool ReadRows(WireReader& reader, uint64_t size, double* rows) {
  uint64_t end = reader.Consumed() + size;
  bool found = false;
  *rows = 1;
  while (reader.Consumed() < end) {
    uint64_t key, value;
    if (!reader.Varint(&key)) return false;
    if ((key >> 3) == 3 && (key & 7) == 0) {  // shape, not packed
      if (!reader.Varint(&value)) return false;
      if (!found) *rows = static_cast<int64_t>(value) > 0 ? static_cast<double>(value) : 1;
      found = true;
    } else if ((key >> 3) == 3 && (key & 7) == 2) {  // shape, packed
      uint64_t length;
      if (!reader.Varint(&length)) return false;
      uint64_t packed_end = reader.Consumed() + length;
      while (reader.Consumed() < packed_end) {
        if (!reader.Varint(&value)) return false;
        if (!found) *rows = static_cast<int64_t>(value) > 0 ? static_cast<double>(value) : 1;
        found = true;
      }
      if (reader.Consumed() != packed_end) return false;
    } else if (!SkipField(reader, key & 7)) {
      return false;
    }
  }
  return reader.Consumed() == end;
}

// model_name (1), model_version (2) and the first input's (5) batch rows of a ModelInferRequest; false if
// it does not parse (the Python router then answers with the precise INVALID_ARGUMENT).
bool ReadModelRef(const std::vector<grpc::Slice>& slices, std::string* name, std::string* version,
                  double* rows = nullptr) {
  WireReader reader(slices);
  bool first_input = true;
  if (rows) *rows = 1;
  while (!reader.AtEnd()) {
    uint64_t key, value;
    if (!reader.Varint(&key)) return false;
    if ((key & 7) != 2) {
      if (!SkipField(reader, key & 7)) return false;
      continue;
    }
    if (!reader.Varint(&value)) return false;
    uint64_t field = key >> 3;
    if (field == 1) { if (!reader.Read(value, name)) return false; }
    else if (field == 2) { if (!reader.Read(value, version)) return false; }
    else if (field == 5 && first_input && rows) {
      if (!ReadRows(reader, value, rows)) return false;
      first_input = false;
    }
    else if (!reader.Skip(value)) return false;
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

// ---- the routing spec (protos/maas/v1/fastpath.proto) -------------------------------------------
// BLAKE2b (RFC 7693), unkeyed, with an `out`-byte digest: KEY_HASH_BLAKE2B_64 (Python's hashlib.blake2b).
std::string Blake2b(const std::string& data, size_t out) {
  static const uint64_t kIv[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                                  0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                                  0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
  static const uint8_t kSigma[12][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
      {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
      {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
      {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
      {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};
  auto rotr = [](uint64_t x, int n) { return (x >> n) | (x << (64 - n)); };
  uint64_t h[8];
  for (int i = 0; i < 8; ++i) h[i] = kIv[i];
  h[0] ^= 0x01010000ULL ^ out;
  auto compress = [&](const uint8_t* block, uint64_t counter, bool last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; ++i) {
      m[i] = 0;
      for (int b = 7; b >= 0; --b) m[i] = m[i] << 8 | block[i * 8 + b];
    }
    for (int i = 0; i < 8; ++i) { v[i] = h[i]; v[i + 8] = kIv[i]; }
    v[12] ^= counter;
    if (last) v[14] = ~v[14];
    auto g = [&](int a, int b, int c, int d, uint64_t x, uint64_t y) {
      v[a] = v[a] + v[b] + x; v[d] = rotr(v[d] ^ v[a], 32); v[c] = v[c] + v[d]; v[b] = rotr(v[b] ^ v[c], 24);
      v[a] = v[a] + v[b] + y; v[d] = rotr(v[d] ^ v[a], 16); v[c] = v[c] + v[d]; v[b] = rotr(v[b] ^ v[c], 63);
    };
    for (const uint8_t* s : kSigma) {
      g(0, 4, 8, 12, m[s[0]], m[s[1]]); g(1, 5, 9, 13, m[s[2]], m[s[3]]);
      g(2, 6, 10, 14, m[s[4]], m[s[5]]); g(3, 7, 11, 15, m[s[6]], m[s[7]]);
      g(0, 5, 10, 15, m[s[8]], m[s[9]]); g(1, 6, 11, 12, m[s[10]], m[s[11]]);
      g(2, 7, 8, 13, m[s[12]], m[s[13]]); g(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
  };
  size_t done = 0;
  while (data.size() - done > 128) {  // every block but the last
    compress(reinterpret_cast<const uint8_t*>(data.data()) + done, done + 128, false);
    done += 128;
  }
  uint8_t last[128] = {0};
  std::copy(data.begin() + done, data.end(), last);
  compress(last, data.size(), true);
  std::string digest;
  for (size_t i = 0; i < out; ++i) digest.push_back(static_cast<char>(h[i / 8] >> (8 * (i % 8))));
  return digest;
}

// Rule 1's keyed draw: the digest of (model, salt, key) joined by the separator, big-endian / 2^64.
// false when the snapshot names a hash this binary does not know (the Python router then answers).
bool KeyPoint(const maas::v1::SplitDraw& draw, const std::string& model, const std::string& key, double* point) {
  if (draw.key_hash() != maas::v1::KEY_HASH_BLAKE2B_64) return false;
  std::string digest = Blake2b(model + draw.key_separator() + draw.salt() + draw.key_separator() + key, 8);
  uint64_t value = 0;
  for (char byte : digest) value = value << 8 | static_cast<uint8_t>(byte);
  *point = static_cast<double>(value) / 18446744073709551616.0;
  return true;
}

// The key-less sequence's next point (routing.py next_point).
double NextPoint(double previous, double step) { return std::fmod(previous + step, 1.0); }

// The index a draw in [0, 1) picks among targets of these weights (routing.py weighted_choice).
size_t WeightedChoice(const std::vector<double>& weights, double point) {
  double total = 0;
  for (double weight : weights) total += weight;
  double rest = point * total;
  for (size_t i = 0; i < weights.size(); ++i) {
    rest -= weights[i];
    if (rest < 0) return i;
  }
  return weights.size() - 1;
}

// A model_version of ASCII digits as a version number (0: not one, or too long to be one we route).
uint32_t VersionNumber(const std::string& text) {
  if (text.empty() || text.size() > 9) return 0;
  uint32_t number = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return 0;
    number = number * 10 + static_cast<uint32_t>(c - '0');
  }
  return number;
}

bool IsDigits(const std::string& text) {
  if (text.empty()) return false;
  for (char c : text) if (c < '0' || c > '9') return false;
  return true;
}

struct Decision {
  uint32_t version = 0;  // 0: the Python router answers
  const char* kind = "";  // the Python router's RouteKind names
};

// Rule 1 (routing.py RoutingTable.resolve). `next_point()` gives the model's next key-less point.
template <typename NextPointFn>
Decision Decide(const Table& table, const std::string& name, const std::string& version, const std::string& key,
                NextPointFn next_point) {
  Decision decision;
  auto found = table.models.find(name);
  if (found == table.models.end()) return decision;
  const ModelRoutes& routes = found->second;
  if (IsDigits(version)) {
    decision.kind = "explicit_version";
    uint32_t number = VersionNumber(version);
    if (routes.ready.count(number)) decision.version = number;
    return decision;
  }
  if (!version.empty()) {
    decision.kind = "alias";
    auto alias = routes.aliases.find(version);
    if (alias != routes.aliases.end()) decision.version = alias->second;
    return decision;
  }
  if (!routes.has_policy) {
    decision.kind = "default";
    decision.version = routes.default_version;
    return decision;
  }
  decision.kind = "traffic_policy";
  if (routes.split_versions.empty()) return decision;
  double point;
  if (key.empty()) point = next_point();
  else if (!KeyPoint(table.draw, name, key, &point)) return decision;
  decision.version = routes.split_versions[WeightedChoice(routes.split_weights, point)];
  return decision;
}

// Rule 2 (services/shared/replica_pool.py less_busy_of_two): first in [0, n), second in [0, n - 1).
size_t LessBusyOfTwo(const std::vector<long>& inflight, uint64_t first, uint64_t second) {
  size_t n = inflight.size();
  if (n == 1) return 0;
  size_t other = (first + 1 + second) % n;
  return inflight[first] <= inflight[other] ? first : other;
}

// Rule 3 (services/router/peers.py retry_reason): "never_sent", "not_serving" or "" (may have run).
std::string RetryReason(grpc::StatusCode code, const std::string& message, grpc_connectivity_state at_issue,
                        grpc_connectivity_state at_failure, const std::string& not_serving_marker) {
  if (code == grpc::StatusCode::UNAVAILABLE && at_issue != GRPC_CHANNEL_READY &&
      at_failure == GRPC_CHANNEL_TRANSIENT_FAILURE) {
    return "never_sent";
  }
  if ((code == grpc::StatusCode::NOT_FOUND || code == grpc::StatusCode::UNAVAILABLE) && !not_serving_marker.empty() &&
      message.rfind(not_serving_marker, 0) == 0) {
    return "not_serving";
  }
  return "";
}

// Rule 4's key check: sha256 of the key in lower-case hex (the registry keeps keys so).
std::string Sha256Hex(const std::string& data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (!EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr)) return "";
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < size; ++i) {
    hex.push_back(kHex[digest[i] >> 4]);
    hex.push_back(kHex[digest[i] & 15]);
  }
  return hex;
}

bool IsAscii(const std::string& text) {
  for (char c : text) if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// What Python's repr() quotes as '<text>' unchanged: printable ASCII without ' or \.
bool ReprSafe(const std::string& text) {
  for (char c : text) if (c < 0x20 || c > 0x7e || c == '\'' || c == '\\') return false;
  return true;
}

std::string AsciiLower(std::string text) {
  for (char& c : text) if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return text;
}

std::string StripSpaces(const std::string& text) {
  size_t begin = text.find_first_not_of(" \t"), end = text.find_last_not_of(" \t");
  return begin == std::string::npos ? "" : text.substr(begin, end - begin + 1);
}

using Metadata = std::vector<std::pair<std::string, std::string>>;

struct Admitted {
  enum Kind { kRouter, kServe, kRefuse } kind = kRouter;  // kRouter: the main port admits (or refuses) it
  const TenantRule* tenant = nullptr;  // kServe with auth on; kRefuse of a known key
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string reason, message;  // kRefuse: maas_tenant_refusals' reason, the main port's words
};

Admitted Refuse(grpc::StatusCode code, const char* reason, std::string message, const TenantRule* tenant = nullptr) {
  Admitted refused;
  refused.kind = Admitted::kRefuse;
  refused.code = code;
  refused.reason = reason;
  refused.message = std::move(message);
  refused.tenant = tenant;
  return refused;
}

// Rule 4 (services/router/admission.py Admission.admit, in its order). `require_auth`: the router runs
// with auth on, so a snapshot without tenants (none received yet) serves nothing here.
Admitted Admit(const Table& table, bool require_auth, const std::string& name, const std::string& version,
               const Metadata& metadata) {
  Admitted admitted;
  if (!table.auth) {
    if (!require_auth) admitted.kind = Admitted::kServe;
    return admitted;
  }
  const AuthRules& auth = *table.auth;
  // The main port's INVALID_ARGUMENT comes first (dataplane.version_selector, wire.read_model_ref).
  if (!IsAscii(name) || !IsAscii(version) || (IsDigits(version) && VersionNumber(version) == 0)) return admitted;
  const std::string* header = nullptr;
  bool asks_priority = false;
  for (const auto& [key, value] : metadata) {  // the last one, as the main port reads them
    if (key == "authorization") header = &value;
    else if (!auth.priority_metadata.empty() && key == auth.priority_metadata) asks_priority = true;
  }
  if (!header) return Refuse(grpc::StatusCode::UNAUTHENTICATED, "unauthenticated", auth.missing_key_message);
  if (!IsAscii(*header)) return admitted;
  size_t space = header->find(' ');
  std::string scheme = header->substr(0, space);
  std::string key = space == std::string::npos ? "" : StripSpaces(header->substr(space + 1));
  if (AsciiLower(scheme) != "bearer" || key.empty()) {
    return Refuse(grpc::StatusCode::UNAUTHENTICATED, "unauthenticated", auth.malformed_key_message);
  }
  if (!auth.synced) return admitted;  // the main port answers UNAVAILABLE
  auto found = auth.by_key_sha256.find(Sha256Hex(key));
  if (found == auth.by_key_sha256.end()) {
    return Refuse(grpc::StatusCode::UNAUTHENTICATED, "unauthenticated", auth.unknown_key_message);
  }
  const TenantRule& tenant = found->second;
  if (tenant.revoked) return Refuse(grpc::StatusCode::UNAUTHENTICATED, "revoked", tenant.revoked_message, &tenant);
  uint32_t number = IsDigits(version) ? VersionNumber(version) : 0;
  const std::string alias = IsDigits(version) ? "" : version;
  bool allowed = tenant.allowed.empty() || tenant.allowed.count(name) ||
                 (!alias.empty() && tenant.allowed.count(name + ":" + alias)) ||
                 (number && tenant.allowed.count(name + ":" + std::to_string(number)));
  if (!allowed) {
    if (!table.models.count(name) || !ReprSafe(alias)) return admitted;  // words only the main port has
    std::string asked = !alias.empty() ? name + ":" + alias : number ? name + ":" + std::to_string(number) : name;
    std::string message = tenant.denied_message;
    size_t at = message.find(auth.asked_placeholder);
    if (auth.asked_placeholder.empty() || at == std::string::npos) return admitted;
    message.replace(at, auth.asked_placeholder.size(), asked);
    return Refuse(grpc::StatusCode::PERMISSION_DENIED, "permission_denied", message, &tenant);
  }
  if (asks_priority || !tenant.served_here) return admitted;
  admitted.kind = Admitted::kServe;
  admitted.tenant = &tenant;
  return admitted;
}

// ---- the forwarder ------------------------------------------------------------------------------
struct Options {
  std::string listen, fallback;
  int max_message_bytes = 64 << 20;
  double default_timeout = 30.0, stats_interval = 1.0, grace = 5.0;
  std::vector<double> duration_buckets;  // upper bounds, ascending (the router's latency histogram's)
  // Upper bounds in ms, ascending: the per-version histogram the router reports for rollouts.
  std::vector<double> version_latency_bounds_ms;
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
  // --require-auth: the router runs with auth on; until a snapshot brings its tenants, nothing is served here.
  bool require_auth = false;
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

// One Triton replica: its channel (whose connectivity state rule 3 reads), stub and calls in flight.
struct Replica {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
  std::atomic<long> inflight{0};
};

class Forwarder {
 public:
  explicit Forwarder(const Options& options)
      : budget(options), options_(options), credentials_(ChannelCredentials(options)),
        table_(std::make_shared<Table>()),
        durations_(options.duration_buckets.size() + 1, 0) {
    fallback_ = std::make_unique<grpc::GenericStub>(Connect(options.fallback));
    rng_.seed(std::random_device{}());
  }

  // Where a ModelInfer goes (rule 1): the version to ask Triton for, or 0 = the Python router.
  Decision Route(const Table& table, const std::string& name, const std::string& version, const std::string& key) {
    return Decide(table, name, version, key, [&] { return NextSequencePoint(name, table.draw.sequence_step()); });
  }

  std::shared_ptr<Table> CurrentTable() {
    std::lock_guard<std::mutex> lock(mutex_);
    return table_;
  }

  grpc::GenericStub* Fallback() { return fallback_.get(); }
  const Options& options() const { return options_; }

  void Apply(std::shared_ptr<Table> table) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (table->replicas != table_->replicas) {
      std::map<std::string, std::shared_ptr<Replica>> kept;
      for (const std::shared_ptr<Replica>& replica : replicas_) kept[replica->address] = replica;
      std::vector<std::shared_ptr<Replica>> replicas;
      for (const std::string& address : table->replicas) {
        auto old = kept.find(address);
        if (old != kept.end()) {
          replicas.push_back(old->second);
        } else {
          auto replica = std::make_shared<Replica>();
          replica->address = address;
          replica->channel = Connect(address);
          replica->stub = std::make_unique<grpc::GenericStub>(replica->channel);
          replicas.push_back(std::move(replica));
        }
      }
      // Calls in flight hold their own reference (see Call::replica_), so dropping ours is safe.
      replicas_ = std::move(replicas);
    }
    table_ = std::move(table);
  }

  // A Triton replica not in `tried` (rule 2: the less busy of two); nullptr when none is left.
  std::shared_ptr<Replica> PickReplica(const std::vector<std::shared_ptr<Replica>>& tried = {}) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::shared_ptr<Replica>> candidates;
    std::vector<long> inflight;
    for (const std::shared_ptr<Replica>& replica : replicas_) {
      if (std::find(tried.begin(), tried.end(), replica) != tried.end()) continue;
      candidates.push_back(replica);
      inflight.push_back(replica->inflight.load());
    }
    if (candidates.empty()) return nullptr;
    size_t n = candidates.size();
    if (n == 1) return candidates[0];
    uint64_t first = std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_);
    uint64_t second = std::uniform_int_distribution<uint64_t>(0, n - 2)(rng_);
    return candidates[LessBusyOfTwo(inflight, first, second)];
  }

  void Count(const std::string& model, const std::string& version, const char* route, grpc::StatusCode code,
             double seconds) {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++counts_[model + "\t" + version + "\t" + route + "\t" + std::to_string(static_cast<int>(code))];
    Time(seconds);
    if (code == grpc::StatusCode::OK) {  // as the router's version figures: latency of answered calls only
      const std::vector<double>& bounds = options_.version_latency_bounds_ms;
      std::vector<long>& counts = latencies_[model + "\t" + version];
      if (counts.empty()) counts.resize(bounds.size() + 1, 0);
      ++counts[std::lower_bound(bounds.begin(), bounds.end(), seconds * 1000.0) - bounds.begin()];
    }
  }

  // A call of `tenant` served here (rule 4), with its cost units.
  void CountTenant(const std::string& tenant, double cost) {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    std::pair<long, double>& counted = tenant_counts_[tenant];
    ++counted.first;
    counted.second += cost;
  }

  // A call refused here (rule 4) with `code`; tenant "" when the key names none.
  void CountRefusal(const std::string& tenant, const std::string& reason, grpc::StatusCode code, double seconds) {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    ++refusals_[tenant + "\t" + reason + "\t" + std::to_string(static_cast<int>(code))];
    Time(seconds);
  }

  void ReportStats() {
    std::map<std::string, long> counts, refusals;
    std::map<std::string, std::pair<long, double>> tenant_counts;
    std::map<std::string, std::vector<long>> latencies;
    std::vector<long> durations(durations_.size(), 0);
    double duration_sum = 0;
    bool timed;
    {
      std::lock_guard<std::mutex> lock(stats_mutex_);
      counts.swap(counts_);
      refusals.swap(refusals_);
      latencies.swap(latencies_);
      timed = !counts.empty() || !refusals.empty();
      tenant_counts.swap(tenant_counts_);
      durations.swap(durations_);
      std::swap(duration_sum, duration_sum_);
    }
    std::ostringstream out;
    out << "stats\t" << inflight.load() << "\n";
    long refused = budget_refusals.exchange(0);
    if (refused) out << "budget_refusals\t" << refused << "\n";
    for (const auto& [key, count] : counts) out << "requests\t" << key << "\t" << count << "\n";
    for (const auto& [tenant, counted] : tenant_counts) {
      out << "tenant\t" << tenant << "\t" << counted.first << "\t" << counted.second << "\n";
    }
    for (const auto& [key, count] : refusals) out << "refusals\t" << key << "\t" << count << "\n";
    if (timed) {
      out << "durations\t";
      for (size_t i = 0; i < durations.size(); ++i) out << (i ? "," : "") << durations[i];
      out << "\t" << duration_sum << "\n";
    }
    for (const auto& [key, counts] : latencies) {
      out << "latencies\t" << key << "\t";
      for (size_t i = 0; i < counts.size(); ++i) out << (i ? "," : "") << counts[i];
      out << "\n";
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

  // One call's duration in the histogram of all calls (stats_mutex_ held).
  void Time(double seconds) {
    const std::vector<double>& bounds = options_.duration_buckets;
    ++durations_[std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin()];  // first bound >= seconds
    duration_sum_ += seconds;
  }

  // The model's key-less sequence (rule 1), from a random start per process.
  double NextSequencePoint(const std::string& model, double step) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = sequence_.find(model);
    double point = found != sequence_.end() ? found->second : std::uniform_real_distribution<double>(0, 1)(rng_);
    point = NextPoint(point, step);
    sequence_[model] = point;
    return point;
  }

  Options options_;
  std::shared_ptr<grpc::ChannelCredentials> credentials_;  // one per process: the watched files are shared
  std::mutex mutex_, stats_mutex_;
  std::shared_ptr<Table> table_;
  std::vector<std::shared_ptr<Replica>> replicas_;
  std::unique_ptr<grpc::GenericStub> fallback_;
  std::unordered_map<std::string, double> sequence_;
  std::mt19937_64 rng_;
  std::map<std::string, long> counts_, refusals_;
  std::map<std::string, std::vector<long>> latencies_;  // "model\tversion" -> counts per version bucket
  std::map<std::string, std::pair<long, double>> tenant_counts_;  // calls, cost units
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
    std::string key;
    for (const auto& [name, value] : context_->client_metadata()) {
      if (!ForwardedHeader(name)) continue;
      if (name == "x-maas-routing-key" && !routing_key) {  // the first one, as the main port reads it
        routing_key = true;
        key.assign(value.data(), value.size());
      }
      metadata_.emplace_back(std::string(name.data(), name.size()), std::string(value.data(), value.size()));
    }
    outgoing_ = &request_;
    if (context_->method() == kModelInfer) {
      std::vector<grpc::Slice> slices;
      std::string version;
      double rows = 1;
      if (request_.Dump(&slices).ok() && ReadModelRef(slices, &model_, &version, &rows)) {
        std::shared_ptr<Table> table = forwarder_->CurrentTable();  // holds `admitted.tenant`
        Admitted admitted = Admit(*table, forwarder_->options().require_auth, model_, version, metadata_);
        if (admitted.kind == Admitted::kRefuse) {
          std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - started_;
          forwarder_->CountRefusal(admitted.tenant ? admitted.tenant->name : "", admitted.reason, admitted.code,
                                   elapsed.count());
          Finish(grpc::Status(admitted.code, Bounded(admitted.message, forwarder_->options().max_status_message_bytes)));
          return;
        }
        Decision decision;
        if (admitted.kind == Admitted::kServe) decision = forwarder_->Route(*table, model_, version, key);
        route_ = decision.kind;
        if (decision.version && (replica_ = forwarder_->PickReplica())) {
          ++forwarder_->inflight;  // only here: a call handed to the Python router is counted there
          if (admitted.tenant) forwarder_->CountTenant(admitted.tenant->name, rows);
          forwarder_->budget.Request();
          version_ = std::to_string(decision.version);
          if (version_ != version) {
            slices.emplace_back(VersionField(version_));
            retargeted_ = grpc::ByteBuffer(slices.data(), slices.size());
            outgoing_ = &retargeted_;
          }
          Send(replica_.get());
          return;
        }
      }
    }
    Send(nullptr);
  }

  void OnDone() override {
    if (replica_) --forwarder_->inflight;
    delete this;
  }

 private:
  // Sends the call to `replica`, or to the Python router when nullptr.
  void Send(Replica* replica) {
    grpc::GenericStub* stub = forwarder_->Fallback();
    if (replica) {
      at_issue_ = replica->channel->GetState(false);
      ++replica->inflight;
      stub = replica->stub.get();
    }
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

  // Rule 3 (services/router/peers.py retry_reason): only a call that provably never ran goes to
  // another replica, once per replica, while the retry budget lasts (a call never sent costs none).
  bool RetryElsewhere(const grpc::Status& status) {
    if (!replica_) return false;
    --replica_->inflight;
    std::string reason = RetryReason(status.error_code(), status.error_message(), at_issue_,
                                     replica_->channel->GetState(false), forwarder_->options().not_serving_marker);
    if (reason.empty()) return false;
    tried_.push_back(replica_);
    std::shared_ptr<Replica> next = forwarder_->PickReplica(tried_);
    if (!next) return false;
    if (reason != "never_sent" && !forwarder_->budget.TryRetry()) {
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
    // What came with the answer goes back with it (the main port's retry-after-ms hint of a quota refusal).
    for (const auto& [key, value] : upstream_->GetServerTrailingMetadata()) {
      if (key.starts_with("grpc-") || key.starts_with(":")) continue;
      context_->AddTrailingMetadata(std::string(key.data(), key.size()), std::string(value.data(), value.size()));
    }
    if (status.ok()) StartWriteAndFinish(&response_, grpc::WriteOptions(), status);
    else Finish(status);
  }

  grpc::GenericCallbackServerContext* context_;
  Forwarder* forwarder_;
  std::unique_ptr<grpc::ClientContext> upstream_;
  std::vector<std::pair<std::string, std::string>> metadata_;  // the caller's, passed on
  const grpc::ByteBuffer* outgoing_ = nullptr;
  std::shared_ptr<Replica> replica_;
  std::vector<std::shared_ptr<Replica>> tried_;
  grpc_connectivity_state at_issue_ = GRPC_CHANNEL_IDLE;
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
// Reads one message framed as fastpath.proto says (size: 4 bytes big-endian, then the bytes).
bool ReadFramed(std::istream& in, std::string* data) {
  unsigned char size[4];
  if (!in.read(reinterpret_cast<char*>(size), 4)) return false;
  uint32_t n = uint32_t{size[0]} << 24 | uint32_t{size[1]} << 16 | uint32_t{size[2]} << 8 | size[3];
  data->resize(n);
  return n == 0 || static_cast<bool>(in.read(&(*data)[0], n));
}

void ReadControl(Forwarder* forwarder) {
  std::string data;
  while (ReadFramed(std::cin, &data)) {
    maas::v1::FastPathSnapshot snapshot;
    if (snapshot.ParseFromString(data)) forwarder->Apply(TableOf(snapshot));
    else std::cerr << "maas-oip-fastpath: ignored a snapshot that does not parse (" << data.size() << " bytes)" << std::endl;
  }
}

// --check-vectors FILE: answers a RoutingVectors message's cases with the functions the calls use,
// one line each: "route <version|router> <kind>", "replica <index>", "retry <reason|->".
int CheckVectors(const std::string& path, const std::string& not_serving_marker) {
  std::ifstream file(path, std::ios::binary);
  maas::v1::RoutingVectors vectors;
  if (!file || !vectors.ParseFromIstream(&file)) {
    std::cerr << "maas-oip-fastpath: " << path << " is not a maas.v1.RoutingVectors message" << std::endl;
    return 2;
  }
  for (const maas::v1::RouteCase& test : vectors.routes()) {
    std::shared_ptr<Table> table = TableOf(test.snapshot());
    double point = test.sequence_start();
    auto next = [&] { return point = NextPoint(point, table->draw.sequence_step()); };
    Decision decision;
    for (uint32_t i = 0; i <= test.draws(); ++i) decision = Decide(*table, test.model(), test.model_version(), test.routing_key(), next);
    std::cout << "route\t" << (decision.version ? std::to_string(decision.version) : "router") << "\t"
              << (*decision.kind ? decision.kind : "-") << "\n";
  }
  for (const maas::v1::ReplicaCase& test : vectors.replicas()) {
    std::vector<long> inflight(test.inflight().begin(), test.inflight().end());
    std::cout << "replica\t" << LessBusyOfTwo(inflight, test.first(), test.second()) << "\n";
  }
  for (const maas::v1::RetryCase& test : vectors.retries()) {
    std::string reason = RetryReason(static_cast<grpc::StatusCode>(test.code()), test.message(),
                                     static_cast<grpc_connectivity_state>(test.state_at_issue()),
                                     static_cast<grpc_connectivity_state>(test.state_at_failure()), not_serving_marker);
    std::cout << "retry\t" << (reason.empty() ? "-" : reason) << "\n";
  }
  for (const maas::v1::AuthCase& test : vectors.auths()) {
    std::shared_ptr<Table> table = TableOf(test.snapshot());
    std::vector<grpc::Slice> slices{grpc::Slice(test.request())};
    std::string name, version;
    double rows = 1;
    Metadata metadata;
    for (const maas::v1::Metadata& entry : test.metadata()) metadata.emplace_back(entry.key(), entry.value());
    std::cout << "auth\t";
    if (!ReadModelRef(slices, &name, &version, &rows)) {
      std::cout << "router\n";
      continue;
    }
    Admitted admitted = Admit(*table, false, name, version, metadata);
    if (admitted.kind == Admitted::kRouter) std::cout << "router";
    else if (admitted.kind == Admitted::kServe) std::cout << "serve\t" << (admitted.tenant ? admitted.tenant->name : "-") << "\t" << rows;
    else std::cout << "refuse\t" << static_cast<int>(admitted.code) << "\t" << admitted.reason << "\t" << admitted.message;
    std::cout << "\n";
  }
  return 0;
}

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

bool ParseArgs(int argc, char** argv, Options* options) {
  for (int i = 1; i < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--require-auth") {  // the one flag without a value
      options->require_auth = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) return false;
    std::string value = argv[i + 1];
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
    else if (flag == "--duration-buckets" || flag == "--version-latency-bounds-ms") {
      std::vector<double>& bounds =
          flag == "--duration-buckets" ? options->duration_buckets : options->version_latency_bounds_ms;
      for (const std::string& bound : Split(value, ',')) bounds.push_back(std::atof(bound.c_str()));
      if (!std::is_sorted(bounds.begin(), bounds.end())) return false;
    }
    else return false;
  }
  bool tls_complete = options->tls_cert.empty() == options->tls_key.empty() &&
                      options->tls_cert.empty() == options->tls_ca.empty();
  return !options->listen.empty() && !options->fallback.empty() && tls_complete;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "--check-vectors") {
    return CheckVectors(argv[2], argc == 5 && std::string(argv[3]) == "--not-serving-marker" ? argv[4] : "");
  }
  Options options;
  if (!ParseArgs(argc, argv, &options)) {
    std::cerr << "usage: maas-oip-fastpath --listen HOST:PORT --fallback HOST:PORT [--max-message-bytes N]"
                 " [--default-timeout S] [--stats-interval S] [--grace S] [--duration-buckets S,S,...]"
                 " [--version-latency-bounds-ms MS,MS,...]"
                 " [--input-error-marker TEXT]... [--not-serving-marker TEXT --not-serving-message TEMPLATE]"
                 " [--max-status-message-bytes N]"
                 " [--tls-cert PEM --tls-key PEM --tls-ca PEM [--tls-client-auth required|optional]"
                 " [--tls-server-name NAME] [--tls-refresh S]] [--require-auth]"
                 "  (routing snapshots on stdin)\n"
                 "       maas-oip-fastpath --check-vectors FILE [--not-serving-marker TEXT]" << std::endl;
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

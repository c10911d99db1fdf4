// edgevlm/generation.py (GenerationConfig, GenerationStats, pick_token, decode_loop, check_prompt), runtime/vlm_ops.py
// (attention_mask, MASK_MIN) and processor.py (StreamDecoder), same names in camelCase. Pure Swift (Foundation only).
import Foundation

public let MAX_NEW_TOKENS = 1_000_000
public let MIN_TEMPERATURE = 1e-6
public let MAX_TEMPERATURE = 100.0

/// "masked" in the decoder's additive attention mask: np.finfo(np.float32).min.
public let MASK_MIN: Float = -3.4028235e38

/// generation.GenerationConfig: temperature 0 is greedy decoding. ``seed`` seeds SplitMix64, not numpy's PCG64.
public struct GenerationConfig: Sendable {
    public let maxNewTokens: Int
    public let temperature: Double
    public let topP: Double
    public let topK: Int
    public let seed: UInt64?
    public let stopIds: [Int]

    public init(maxNewTokens: Int = 64, temperature: Double = 0, topP: Double = 1, topK: Int = 0, seed: UInt64? = nil,
                stopIds: [Int] = []) throws {
        let fixN = "ask for 1 to \(MAX_NEW_TOKENS) new tokens (e.g. 128)"
        if maxNewTokens < 1 { throw ConfigError("max_new_tokens=\(maxNewTokens) is less than one token", fixN) }
        if maxNewTokens > MAX_NEW_TOKENS { throw ConfigError("max_new_tokens=\(maxNewTokens) is more than any model's context", fixN) }
        let fixT = "use 0 (greedy) or a temperature from \(MIN_TEMPERATURE) to \(MAX_TEMPERATURE) (e.g. 0.7)"
        if !temperature.isFinite { throw ConfigError("temperature=\(temperature) is not a finite number", fixT) }
        if temperature < 0 { throw ConfigError("temperature=\(temperature) is negative", fixT) }
        if temperature > 0 && temperature < MIN_TEMPERATURE {
            throw ConfigError("temperature=\(temperature) is too small to sample with (logits / temperature overflows)", fixT)
        }
        if temperature > MAX_TEMPERATURE { throw ConfigError("temperature=\(temperature) is absurdly large", fixT) }
        if !(topP > 0 && topP <= 1) { throw ConfigError("top_p=\(topP) is outside (0, 1]", "use a top_p in (0, 1], e.g. 0.9, or 1 to disable") }
        if topK < 0 { throw ConfigError("top_k=\(topK) is negative", "use 0 to disable, or a positive count") }
        self.maxNewTokens = maxNewTokens; self.temperature = temperature; self.topP = topP; self.topK = topK
        self.seed = seed; self.stopIds = stopIds
    }
}

/// generation.GenerationStats (seconds).
public struct GenerationStats: Sendable {
    public var promptTokens = 0
    public var imageTokens = 0
    public var newTokens = 0
    public var timeToFirstTokenS = 0.0
    public var decodeTokensPerS = 0.0
    public var stoppedBy = ""
    public var encodeS = 0.0
    public init() {}
}

/// SplitMix64: a small seeded generator for the sampler's uniform draws (numpy's PCG64 is not ported: the same
/// seed gives the same distribution as Python, not the same samples).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// np.argmax: the first index of the largest value.
public func argmax(_ x: [Float]) -> Int {
    var best = 0
    for i in 1..<max(x.count, 1) where x[i] > x[best] { best = i }
    return best
}

/// generation.pick_token. Greedy (temperature 0) is the same argmax. Sampling follows the same steps in Double
/// (divide by temperature, top-k cut at the k-th largest value, softmax, top-p keeping the top token, then the inverse
/// CDF as numpy's Generator.choice: cumsum, normalised by its last value, the first index whose cdf exceeds a uniform
/// draw).
public func pickToken(_ logits: [Float], _ cfg: GenerationConfig, _ rng: inout SplitMix64) -> Int {
    if cfg.temperature == 0 { return argmax(logits) }
    let n = logits.count
    var x = logits.map { Double($0) / cfg.temperature }
    if cfg.topK > 0 {
        let k = min(cfg.topK, n)
        let kth = x.sorted(by: >)[k - 1]
        for i in 0..<n where x[i] < kth { x[i] = -.infinity }
    }
    let m = x.max() ?? 0
    var p = x.map { exp($0 - m) }
    var s = p.reduce(0, +)
    p = p.map { $0 / s }
    if cfg.topP < 1 {
        let order = (0..<n).sorted { p[$0] > p[$1] || (p[$0] == p[$1] && $0 < $1) }   // stable, as argsort(-p, "stable")
        var q = [Double](repeating: 0, count: n)
        var cum = 0.0
        for i in order {
            cum += p[i]
            if cum - p[i] < cfg.topP { q[i] = p[i] }                                  // always keeps the top token
        }
        s = q.reduce(0, +)
        p = q.map { $0 / s }
    }
    let u = Double.random(in: 0..<1, using: &rng)
    var cdf = [Double](repeating: 0, count: n)
    var acc = 0.0
    for i in 0..<n { acc += p[i]; cdf[i] = acc }
    let last = cdf[n - 1]
    for i in 0..<n where cdf[i] / last > u { return i }
    return n - 1
}

/// vlm_ops.attention_mask: (1, 1, nNew, nPast + nNew) additive mask flattened, causal; bidirectionalPrefix > 1 lets
/// the first that many positions see each other (prefill only).
public func attentionMask(_ nNew: Int, _ nPast: Int = 0, _ bidirectionalPrefix: Int = 0) -> [Float] {
    let total = nPast + nNew
    var out = [Float](repeating: 0, count: nNew * total)
    for i in 0..<nNew {
        let q = nPast + i
        for k in 0..<total {
            var allowed = k <= q
            if bidirectionalPrefix > 1 && q < bidirectionalPrefix && k < bidirectionalPrefix { allowed = true }
            out[i * total + k] = allowed ? 0 : MASK_MIN
        }
    }
    return out
}

/// Seconds since an arbitrary start, monotonic (time.perf_counter).
func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// generation.decode_loop: prefill() once, then step(token) per new token (the caller keeps the KV cache); stops at a
/// stop id, at maxNewTokens or at the context's end, and fills stats. ``emit`` receives each token (Python yields it)
/// and returns false to stop early (a cancelled stream).
public func decodeLoop(prefill: () throws -> [Float], step: (Int) throws -> [Float], pick: ([Float]) -> Int,
                       cfg: GenerationConfig, stats: inout GenerationStats, nPrompt: Int, maxContext: Int,
                       emit: (Int) throws -> Bool) throws {
    if nPrompt >= maxContext {
        throw ConfigError("the prompt takes \(nPrompt) tokens (with the image), the context holds \(maxContext)", "shorten the prompt")
    }
    let budget = min(cfg.maxNewTokens, maxContext - nPrompt)
    let stop = Set(cfg.stopIds)
    let t0 = now()
    var logits = try prefill()
    stats.stoppedBy = budget == cfg.maxNewTokens ? "max_new_tokens" : "context"
    var tFirst: Double? = nil
    for i in 0..<budget {
        let tok = pick(logits)
        if tFirst == nil {
            tFirst = now()
            stats.timeToFirstTokenS = tFirst! - t0
        }
        if stop.contains(tok) {
            stats.stoppedBy = "stop token"
            break
        }
        stats.newTokens = i + 1
        if !(try emit(tok)) { stats.stoppedBy = "cancelled"; break }
        if i + 1 == budget { break }
        logits = try step(tok)
    }
    if let t = tFirst, stats.newTokens > 1 {
        stats.decodeTokensPerS = Double(stats.newTokens - 1) / max(now() - t, 1e-9)
    }
}

/// generation.check_prompt: refuses control characters (tabs and newlines allowed). Swift strings cannot hold lone
/// surrogates, so that half of the Python check has nothing to do here.
@discardableResult
public func checkPrompt(_ text: String, _ what: String = "the prompt") throws -> String {
    for (i, u) in text.unicodeScalars.enumerated() {
        let v = u.value
        if (v < 32 && v != 9 && v != 10 && v != 13) || v == 0x7f {
            throw ConfigError("\(what) holds the control character U+\(String(format: "%04X", v)) at character \(i)",
                              "remove control characters from the prompt (tabs and newlines are fine)")
        }
    }
    return text
}

/// processor.StreamDecoder: text deltas of a growing id list without splitting UTF-8 characters.
public final class StreamDecoder {
    private let decode: ([Int]) -> String
    private var ids: [Int] = []
    private var text = ""
    public init(_ decode: @escaping ([Int]) -> String) { self.decode = decode }

    public func push(_ tokenId: Int) -> String {
        ids.append(tokenId)
        let now = decode(ids)
        if now.hasSuffix("\u{FFFD}") { return "" }
        return take(now)
    }

    public func flush() -> String { take(decode(ids)) }

    private func take(_ now: String) -> String {
        // Python slices code points: text[len(self.text):]
        let scalars = Array(now.unicodeScalars)
        let old = text.unicodeScalars.count
        text = now
        var out = String.UnicodeScalarView()
        if old < scalars.count { out.append(contentsOf: scalars[old...]) }
        return String(out)
    }
}

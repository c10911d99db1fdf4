// edgevlm/generation.py (GenerationConfig, GenerationStats, pick_token, decode_loop), runtime/vlm_ops.py
// (attention_mask) and processor.py (StreamDecoder, check_prompt via generation.check_prompt), same names in
// camelCase. Pure Kotlin (no Android, no ONNX Runtime): tests/test_apps_android.py compiles it with kotlinc where
// one is installed and compares it with the Python functions.
package io.edgevlm.android

import java.util.SplittableRandom
import kotlin.math.exp

const val MAX_NEW_TOKENS = 1_000_000
const val MIN_TEMPERATURE = 1e-6
const val MAX_TEMPERATURE = 100.0

/** "masked" in the decoder's additive attention mask: np.finfo(np.float32).min. */
const val MASK_MIN = -3.4028235e38f

/** generation.GenerationConfig: temperature 0 is greedy decoding. ``seed`` seeds java.util.SplittableRandom, not
 *  numpy's PCG64 (see pickToken). */
class GenerationConfig(val maxNewTokens: Int = 64, val temperature: Double = 0.0, val topP: Double = 1.0,
                       val topK: Int = 0, val seed: Long? = null, val stopIds: IntArray = IntArray(0)) {
    init {
        val fixN = "ask for 1 to $MAX_NEW_TOKENS new tokens (e.g. 128)"
        if (maxNewTokens < 1) throw ConfigError("max_new_tokens=$maxNewTokens is less than one token", fixN)
        if (maxNewTokens > MAX_NEW_TOKENS) throw ConfigError("max_new_tokens=$maxNewTokens is more than any model's context", fixN)
        val fixT = "use 0 (greedy) or a temperature from $MIN_TEMPERATURE to $MAX_TEMPERATURE (e.g. 0.7)"
        if (temperature.isNaN() || temperature.isInfinite()) throw ConfigError("temperature=$temperature is not a finite number", fixT)
        if (temperature < 0) throw ConfigError("temperature=$temperature is negative", fixT)
        if (temperature > 0 && temperature < MIN_TEMPERATURE) throw ConfigError(
            "temperature=$temperature is too small to sample with (logits / temperature overflows)", fixT)
        if (temperature > MAX_TEMPERATURE) throw ConfigError("temperature=$temperature is absurdly large", fixT)
        if (!(topP > 0 && topP <= 1)) throw ConfigError("top_p=$topP is outside (0, 1]", "use a top_p in (0, 1], e.g. 0.9, or 1 to disable")
        if (topK < 0) throw ConfigError("top_k=$topK is negative", "use 0 to disable, or a positive count")
    }
}

/** generation.GenerationStats (seconds). */
class GenerationStats {
    var promptTokens = 0
    var imageTokens = 0
    var newTokens = 0
    var timeToFirstTokenS = 0.0
    var decodeTokensPerS = 0.0
    var stoppedBy = ""
    var encodeS = 0.0
}

/** np.argmax: the first index of the largest value. */
fun argmax(x: FloatArray): Int {
    var best = 0
    for (i in 1 until x.size) if (x[i] > x[best]) best = i
    return best
}

/** generation.pick_token. Greedy (temperature 0) is the same argmax. Sampling follows the same steps in float64
 *  (divide by temperature, top-k cut at the k-th largest value, softmax, top-p keeping the top token, then the
 *  inverse CDF as numpy's Generator.choice does it: cumsum, normalise by the last value, first index whose cdf
 *  exceeds a uniform draw); the uniform draw comes from java.util.SplittableRandom(seed), not numpy's PCG64, so a
 *  seed gives the same distribution but not the same samples as the Python runtime. */
fun pickToken(logits: FloatArray, cfg: GenerationConfig, rng: SplittableRandom?): Int {
    if (cfg.temperature == 0.0) return argmax(logits)
    val n = logits.size
    val x = DoubleArray(n) { logits[it].toDouble() / cfg.temperature }
    if (cfg.topK > 0) {
        val k = minOf(cfg.topK, n)
        val kth = x.sortedArrayDescending()[k - 1]
        for (i in 0 until n) if (x[i] < kth) x[i] = Double.NEGATIVE_INFINITY
    }
    var m = Double.NEGATIVE_INFINITY
    for (v in x) if (v > m) m = v
    var p = DoubleArray(n) { exp(x[it] - m) }
    var s = p.sum()
    for (i in 0 until n) p[i] /= s
    if (cfg.topP < 1) {
        val order = (0 until n).sortedByDescending { p[it] }          // stable, as argsort(-p, kind="stable")
        val q = DoubleArray(n)
        var cum = 0.0
        for (i in order) {
            cum += p[i]
            if (cum - p[i] < cfg.topP) q[i] = p[i]                       // always keeps the top token
        }
        s = q.sum()
        p = DoubleArray(n) { q[it] / s }
    }
    val u = (rng ?: SplittableRandom()).nextDouble()
    val cdf = DoubleArray(n)
    var acc = 0.0
    for (i in 0 until n) { acc += p[i]; cdf[i] = acc }
    val last = cdf[n - 1]
    for (i in 0 until n) if (cdf[i] / last > u) return i
    return n - 1
}

/** vlm_ops.attention_mask: (1, 1, nNew, nPast + nNew) additive mask, causal; bidirectionalPrefix > 1 lets the first
 *  that many positions see each other (prefill only). */
fun attentionMask(nNew: Int, nPast: Int = 0, bidirectionalPrefix: Int = 0): FloatArray {
    val total = nPast + nNew
    val out = FloatArray(nNew * total)
    for (i in 0 until nNew) {
        val q = nPast + i
        for (k in 0 until total) {
            var allowed = k <= q
            if (bidirectionalPrefix > 1 && q < bidirectionalPrefix && k < bidirectionalPrefix) allowed = true
            out[i * total + k] = if (allowed) 0.0f else MASK_MIN
        }
    }
    return out
}

/** generation.decode_loop: prefill() once, then step(token) per new token (the caller keeps the KV cache);
 *  stops at a stop id, at maxNewTokens or at the context's end, and fills stats. */
fun decodeLoop(prefill: () -> FloatArray, step: (Int) -> FloatArray, pick: (FloatArray) -> Int,
               cfg: GenerationConfig, stats: GenerationStats, nPrompt: Int, maxContext: Int): Sequence<Int> = sequence {
    if (nPrompt >= maxContext) throw ConfigError(
        "the prompt takes $nPrompt tokens (with the image), the context holds $maxContext", "shorten the prompt")
    val budget = minOf(cfg.maxNewTokens, maxContext - nPrompt)
    val stop = cfg.stopIds.toSet()
    val t0 = System.nanoTime()
    var logits = prefill()
    stats.stoppedBy = if (budget == cfg.maxNewTokens) "max_new_tokens" else "context"
    var tFirst = -1L
    for (i in 0 until budget) {
        val tok = pick(logits)
        if (tFirst < 0) {
            tFirst = System.nanoTime()
            stats.timeToFirstTokenS = (tFirst - t0) / 1e9
        }
        if (tok in stop) {
            stats.stoppedBy = "stop token"
            break
        }
        stats.newTokens = i + 1
        yield(tok)
        if (i + 1 == budget) break
        logits = step(tok)
    }
    if (tFirst >= 0 && stats.newTokens > 1)
        stats.decodeTokensPerS = (stats.newTokens - 1) / maxOf((System.nanoTime() - tFirst) / 1e9, 1e-9)
}

/** generation.check_prompt: refuses control characters and lone surrogates. */
fun checkPrompt(text: String, what: String = "the prompt"): String {
    var i = 0
    while (i < text.length) {
        val c = text[i]
        if (Character.isHighSurrogate(c) && i + 1 < text.length && Character.isLowSurrogate(text[i + 1])) { i += 2; continue }
        if (Character.isSurrogate(c)) throw ConfigError(
            "$what holds a lone surrogate U+${"%04X".format(c.toInt())} at character $i, which is not valid text",
            "pass the prompt as valid Unicode text (a surrogate pair's two halves belong together)")
        if ((c.toInt() < 32 && c != '\t' && c != '\n' && c != '\r') || c.toInt() == 0x7f) throw ConfigError(
            "$what holds the control character U+${"%04X".format(c.toInt())} at character $i",
            "remove control characters from the prompt (tabs and newlines are fine)")
        i++
    }
    return text
}

/** processor.StreamDecoder: text deltas of a growing id list without splitting UTF-8 characters; ``decode`` is the
 *  bundle's detokenizer. */
class StreamDecoder(private val decode: (List<Int>) -> String) {
    private val ids = ArrayList<Int>()
    private var text = ""

    fun push(tokenId: Int): String {
        ids.add(tokenId)
        val now = decode(ids)
        if (now.endsWith("\uFFFD")) return ""
        val delta = now.substring(minOf(text.length, now.length))
        text = now
        return delta
    }

    fun flush(): String {
        val now = decode(ids)
        val delta = now.substring(minOf(text.length, now.length))
        text = now
        return delta
    }
}

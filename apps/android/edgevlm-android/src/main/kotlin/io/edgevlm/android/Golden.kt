// edgevlm/runtime/golden.py, ported: the golden cases' figures (vlm_figures, coarse_kl, log_softmax), the criteria
// (vlm_criteria, with the same margins) and the judging (judge, Report, verify). Pure Kotlin: VlmPipeline.verify()
// reads golden/golden.json (Bundle.kt) and hands this file the cases and a trace function (vlmTrace).
// tests/test_apps_android.py checks these constants against runtime/golden.py and, where kotlinc is installed,
// compares the figures with the Python ones on the same inputs.
package io.edgevlm.android

import java.math.BigDecimal
import java.math.RoundingMode
import kotlin.math.exp
import kotlin.math.floor
import kotlin.math.ln

const val GOLDEN_DIR = "golden"
const val GOLDEN_JSON = "golden/golden.json"
const val VERSION = 1
const val TOP_K = 5
const val NEW_TOKENS = 32
const val TOP1_MARGIN = 0.10
const val PREFIX_FRACTION = 0.5
const val KL_FACTOR = 2.0
const val TIE_GAP = 0.25
const val KL_SLACK = 0.02
const val KL_SLACK_INT4 = 0.05
val VLM_CRITERIA = listOf("same_greedy_tokens", "teacher_forced_top1_agreement_min", "prefix_tokens_min", "kl_mean_max")

/** eager.top5 of a case: per step the top-k ids, their logits and the row's logsumexp. */
class TopK(val ids: Array<IntArray>, val logits: Array<DoubleArray>, val logsumexp: DoubleArray)

/** One VLM case of golden.json. ``criteria`` values: Boolean (must equal) or Number (``_min`` / ``_max`` bounds). */
class GoldenCase(val id: String, val image: String, val prompt: String, val tokens: IntArray, val top5: TopK,
                 val criteria: Map<String, Any>)

/** golden.vlm_trace's result: greedy ids (no early stop), logits teacher-forced on eager's tokens. */
class Trace(val ids: List<Int>, val logits: Array<FloatArray>, val promptLen: Int)

/** golden.log_softmax in float64. */
fun logSoftmax(x: FloatArray): DoubleArray {
    var m = Double.NEGATIVE_INFINITY
    for (v in x) if (v > m) m = v.toDouble()
    var s = 0.0
    for (v in x) s += exp(v - m)
    val lse = ln(s)
    return DoubleArray(x.size) { x[it] - m - lse }
}

private fun checkIds(ids: Array<IntArray>, width: Int) {
    val top = ids.maxOf(-1) { r -> r.maxOf(-1) { it } }
    if (top >= width) throw BundleError("a golden case names id $top but the model gives $width logits",
        "export the bundle again")
}

private inline fun <T> Array<T>.maxOf(empty: Int, f: (T) -> Int): Int { var m = empty; for (r in this) m = maxOf(m, f(r)); return m }
private inline fun IntArray.maxOf(empty: Int, f: (Int) -> Int): Int { var m = empty; for (r in this) m = maxOf(m, f(r)); return m }

/** golden.coarse_kl: KL(eager || device) per row over eager's top-k tokens and one bin for all others. */
fun coarseKl(ref: TopK, logits: Array<FloatArray>): DoubleArray {
    checkIds(ref.ids, logits[0].size)
    val eps = 1e-12
    fun term(a: Double, b: Double) = if (a > eps) a * (ln(maxOf(a, eps)) - ln(maxOf(b, eps))) else 0.0
    return DoubleArray(ref.ids.size) { r ->
        val lq = logSoftmax(logits[r])
        var kl = 0.0
        var pSum = 0.0
        var qSum = 0.0
        for (j in ref.ids[r].indices) {
            val p = exp(ref.logits[r][j] - ref.logsumexp[r])
            val q = exp(lq[ref.ids[r][j]])
            kl += term(p, q)
            pSum += p
            qSum += q
        }
        val pRest = (1 - pSum).coerceIn(0.0, 1.0)
        val qRest = (1 - qSum).coerceIn(0.0, 1.0)
        maxOf(kl + term(pRest, qRest), 0.0)
    }
}

/** golden.vlm_figures: a device's greedy ``ids`` and its teacher-forced logits against the case. */
fun vlmFigures(case: GoldenCase, ids: List<Int>, forcedLogits: Array<FloatArray>): Map<String, Any> {
    val ref = case.tokens
    val n = ref.size
    if (forcedLogits.size < n) throw ConfigError(
        "the device gave ${forcedLogits.size} teacher-forced steps for $n golden tokens", "report this as a bug")
    val forced = forcedLogits.copyOfRange(0, n)
    var first = -1
    for (i in 0 until minOf(n, ids.size)) if (ref[i] != ids[i]) { first = i; break }
    val prefix = if (first >= 0) first else minOf(ids.size, n)
    var agree = 0
    for (i in 0 until n) if (argmax(forced[i]) == case.top5.ids[i][0]) agree++
    return mapOf("same_greedy_tokens" to (first < 0 && ids.size >= n), "prefix_tokens" to prefix,
        "teacher_forced_top1_agreement" to agree.toDouble() / n, "kl_mean" to coarseKl(case.top5, forced).average(),
        "new_tokens" to n)
}

/** Python's round(x, digits): half-even on the exact binary value. */
fun pyRound(x: Double, digits: Int): Double = BigDecimal(x).setScale(digits, RoundingMode.HALF_EVEN).toDouble()

/** golden.first_near_tie: the first step at which eager's two best logits lie within TIE_GAP nats, or null. */
fun firstNearTie(top5: TopK): Int? {
    for (i in top5.logits.indices) {
        val row = top5.logits[i]
        if (row.size > 1 && row[0] - row[1] < TIE_GAP) return i
    }
    return null
}

/** golden.vlm_criteria: one case's criteria from its figures on every decoder (the loosest of them); ``nearTie``
 *  (firstNearTie of the case) caps the prefix bound. */
fun vlmCriteria(precision: String, measured: List<Map<String, Any>>, nearTie: Int? = null): Map<String, Any> {
    if (precision == "fp32") return mapOf("same_greedy_tokens" to true, "teacher_forced_top1_agreement_min" to 1.0)
    if (measured.isEmpty()) return mapOf("teacher_forced_top1_agreement_min" to 0.5, "kl_mean_max" to 0.5,
        "basis" to "defaults (not measured)")
    val top1 = measured.map { (it["teacher_forced_top1_agreement"] as Number).toDouble() }.reduce { a, b -> minOf(a, b) }
    val prefix = measured.map { (it["prefix_tokens"] as Number).toInt() }.reduce { a, b -> minOf(a, b) }
    val kl = measured.map { (it["kl_mean"] as Number).toDouble() }.reduce { a, b -> maxOf(a, b) }
    var prefixMin = floor(PREFIX_FRACTION * prefix).toInt()
    if (nearTie != null) prefixMin = minOf(prefixMin, nearTie)
    val slack = if (precision == "int4") KL_SLACK_INT4 else KL_SLACK
    return mapOf("teacher_forced_top1_agreement_min" to pyRound(maxOf(0.0, top1 - TOP1_MARGIN), 4),
        "prefix_tokens_min" to prefixMin, "kl_mean_max" to pyRound(KL_FACTOR * kl + slack, 6))
}

/** golden.Row */
class Row(val case: String, val backend: String, val criterion: String, val measured: Any, val bound: Any,
          val passed: Boolean)

/** golden.judge: one row per criterion; ``X_min`` / ``X_max`` bound figure X, any other name must equal it. */
fun judge(caseId: String, backend: String, figures: Map<String, Any>, criteria: Map<String, Any>): List<Row> {
    val rows = ArrayList<Row>()
    for ((key, bound) in criteria) {
        if (key == "basis") continue
        val suffix = if (key.length >= 4) key.substring(key.length - 4) else ""
        val name = if (suffix == "_min" || suffix == "_max") key.substring(0, key.length - 4) else key
        val got = figures[name] ?: throw BundleError("a golden case has the unknown criterion $key",
            "export the bundle again with this edgevlm-android's edgevlm version")
        val sign: String
        val ok: Boolean
        when (suffix) {
            "_min" -> { sign = ">="; ok = (got as Number).toDouble() >= (bound as Number).toDouble() }
            "_max" -> { sign = "<="; ok = (got as Number).toDouble() <= (bound as Number).toDouble() }
            else -> {
                sign = "=="
                ok = if (got is Number && bound is Number) got.toDouble() == bound.toDouble() else got == bound
            }
        }
        val shown = if (got is Double) pyRound(got, 6) else got
        rows.add(Row(caseId, backend, "$name $sign $bound", shown, bound, ok))
    }
    return rows
}

/** golden.Report */
class Report(val bundle: String, val backend: String, val golden: Boolean, val rows: List<Row> = emptyList(),
             val note: String = "", val placement: String = "") {
    val passed: Boolean get() = rows.all { it.passed }

    /** golden.format_reports for one report, one line per row. */
    fun format(): String {
        val lines = rows.map { "${it.case}  ${it.backend}  ${it.criterion}  ${it.measured}  ${if (it.passed) "pass" else "FAIL"}" }
            .toMutableList()
        if (note.isNotEmpty()) lines.add("$backend: $note")
        lines.add("$bundle on $backend" + (if (placement.isNotEmpty()) " ($placement)" else "") +
            ": ${if (passed) "PASS" else "FAIL"}" + (if (golden) "" else " (no golden cases: see the note)"))
        return lines.joinToString("\n")
    }
}

/** golden.verify for VLM cases: trace each case on the device and judge it by its stored criteria. */
fun verify(bundle: String, backend: String, placement: String, cases: List<GoldenCase>,
           trace: (GoldenCase) -> Trace): Report {
    val rows = ArrayList<Row>()
    for (case in cases) {
        val got = trace(case)
        rows.addAll(judge(case.id, backend, vlmFigures(case, got.ids, got.logits), case.criteria))
    }
    return Report(bundle, backend, true, rows, placement = placement)
}

/** golden._no_golden */
fun noGolden(bundle: String, backend: String, madeBy: String?): Report = Report(bundle, backend, false, note =
    "no golden cases (exported by edgevlm ${madeBy ?: "an older edgevlm"}, before bundles carried them): verified by " +
        "what it has, the checksums of every file; export it again for a device check")

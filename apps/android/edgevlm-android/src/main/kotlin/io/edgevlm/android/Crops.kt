// SmolVLM / Idefics3 tiles (image.mode idefics3_tiles), step for step as edgevlm/data/crops.py (idefics3_params,
// _fit_longest, _tile_multiple, idefics3_grid, idefics3_tiles_with_grid, idefics3_image_text, idefics3_text_runs) and
// the id runs of runtime/vlm.py's VLMPipeline._prepare_tiles. Every resize is Pillow's (Preprocess.kt's resize, which
// ports libImaging/Resample.c, LANCZOS included). Pure Kotlin (no Android, Kotlin 1.3 syntax): tests/test_apps_android.py
// compiles it with kotlinc where one is installed and compares its views, grid and prompt runs with Python's.
package io.edgevlm.android

import kotlin.math.ceil

// data/crops.py IDEFICS3_DEFAULTS, IDEFICS3_MAX_SIDE and the processor's tokens
const val IDEFICS3_LONGEST_EDGE = 2048
const val IDEFICS3_SPLITTING = true
const val IDEFICS3_RESAMPLE = "lanczos"
const val IDEFICS3_MAX_SIDE = 4096
const val FAKE_TOKEN = "<fake_token_around_image>"
const val GLOBAL_TOKEN = "<global-img>"
const val IMAGE_TOKEN = "<image>"

/** crops._RESAMPLE: the filters an image layout may name in options.resample. */
val LAYOUT_RESAMPLE = listOf("lanczos", "bicubic", "bilinear")

/** crops.idefics3_params: the tile size and the layout options with IDEFICS3_DEFAULTS filled in. */
class Idefics3Params(val size: Int, val longestEdge: Int, val splitting: Boolean, val resample: String)

fun idefics3Params(spec: ImageSpec): Idefics3Params {
    val o = spec.options
    val longest = o["longest_edge"] ?: IDEFICS3_LONGEST_EDGE
    if (longest !is Number || longest.toInt() < 1) throw BundleError(
        "generation.image.options.longest_edge is $longest, not a positive number", "re-export the bundle")
    val split = o["splitting"] ?: IDEFICS3_SPLITTING
    val splitting = when (split) {                          // Python's truth value of the JSON value
        is Boolean -> split
        is Number -> split.toDouble() != 0.0
        else -> throw BundleError("generation.image.options.splitting is $split, not true/false", "re-export the bundle")
    }
    val resample = (o["resample"] ?: IDEFICS3_RESAMPLE).toString()
    if (resample !in LAYOUT_RESAMPLE) throw BundleError("generation.image.options.resample is '$resample'",
        "use one of: ${LAYOUT_RESAMPLE.joinToString()}")
    return Idefics3Params(spec.size, longest.toInt(), splitting, resample)
}

/** crops._fit_longest: (height, width) with the longest side ``longest``, the other truncated then rounded up to
 *  even, then both capped at IDEFICS3_MAX_SIDE (the processor's two-step rule). */
fun fitLongest(height: Int, width: Int, longest: Int): Pair<Int, Int> {
    var h = height
    var w = width
    var aspect = w.toDouble() / h
    if (w >= h) {
        w = longest
        h = (longest / aspect).toInt()                      // Python's int(): truncation toward zero
        h += h % 2
    } else {
        h = longest
        w = (longest * aspect).toInt()
        w += w % 2
    }
    h = maxOf(h, 1)
    w = maxOf(w, 1)
    aspect = w.toDouble() / h
    if (w >= h && w > IDEFICS3_MAX_SIDE) {
        w = IDEFICS3_MAX_SIDE
        h = (IDEFICS3_MAX_SIDE / aspect).toInt()
    } else if (h > w && h > IDEFICS3_MAX_SIDE) {
        h = IDEFICS3_MAX_SIDE
        w = (IDEFICS3_MAX_SIDE * aspect).toInt()
    }
    return Pair(maxOf(h, 1), maxOf(w, 1))
}

/** crops._tile_multiple: (height, width) rounded up to multiples of ``size``, the shorter side following the aspect. */
fun tileMultiple(height: Int, width: Int, size: Int): Pair<Int, Int> {
    var h = height
    var w = width
    val aspect = w.toDouble() / h
    if (w >= h) {
        w = ceil(w.toDouble() / size).toInt() * size
        h = ceil((w / aspect).toInt().toDouble() / size).toInt() * size
    } else {
        h = ceil(h.toDouble() / size).toInt() * size
        w = ceil((h * aspect).toInt().toDouble() / size).toInt() * size
    }
    return Pair(h, w)
}

/** crops.idefics3_grid: (rows, cols) of tiles for an image of (height, width) pixels; (0, 0): one global view only. */
fun idefics3Grid(height: Int, width: Int, p: Idefics3Params): Pair<Int, Int> {
    if (!p.splitting) return Pair(0, 0)
    val fit = fitLongest(height, width, p.longestEdge)
    val t = tileMultiple(fit.first, fit.second, p.size)
    return if (t.first > p.size || t.second > p.size) Pair(t.first / p.size, t.second / p.size) else Pair(0, 0)
}

/** idefics3TilesWithGrid's result: (views, 3, size, size) float32 flattened, the view count and (rows, cols). */
class TilesWithGrid(val views: FloatArray, val count: Int, val grid: Pair<Int, Int>)

/** The tiles' normalization: x * (1/255) in float64, cast to float32, then (x - mean) / std in float32. */
private fun idefics3Normalize(img: RgbImage, spec: ImageSpec, out: FloatArray, offset: Int) {
    val hw = img.width * img.height
    val scale = 1.0 / 255.0
    for (i in 0 until hw) for (ch in 0 until 3)
        out[offset + ch * hw + i] = ((img.rgb[i * 3 + ch] * scale).toFloat() - spec.mean[ch]) / spec.std[ch]
}

/** crops.idefics3_tiles_with_grid (what VLMPipeline._prepare_tiles runs on load_image's RGB): the views (tiles
 *  row-major, then the global view) and the (rows, cols) grid. */
fun idefics3TilesWithGrid(img: RgbImage, spec: ImageSpec): TilesWithGrid {
    checkSize(img.width, img.height, "the image")             // load_image's limits
    val p = idefics3Params(spec)
    val size = p.size
    val fit = fitLongest(img.height, img.width, p.longestEdge)
    var h = fit.first
    var w = fit.second
    var im = resize(img, w, h, p.resample)
    if (p.splitting) {
        val t = tileMultiple(h, w, size)
        h = t.first
        w = t.second
        im = resize(im, w, h, p.resample)
    }
    val split = p.splitting && (h > size || w > size)
    val rows = if (split) h / size else 0
    val cols = if (split) w / size else 0
    val n = rows * cols + 1
    val per = 3 * size * size
    val out = FloatArray(n * per)
    for (r in 0 until rows) for (c in 0 until cols)
        idefics3Normalize(crop(im, c * size, r * size, size), spec, out, (r * cols + c) * per)
    val global = if (h != size || w != size) resize(im, size, size, p.resample) else im
    idefics3Normalize(global, spec, out, (n - 1) * per)
    return TilesWithGrid(out, n, Pair(rows, cols))
}

/** crops.idefics3_image_text: the processor's text for one image with each view's slot as null (text, null, ...). */
fun idefics3ImageText(rows: Int, cols: Int): List<String?> {
    val out = ArrayList<String?>()
    for (r in 0 until rows) {
        for (c in 0 until cols) {
            out.add("$FAKE_TOKEN<row_${r + 1}_col_${c + 1}>")
            out.add(null)
        }
        out.add("\n")
    }
    out.add((if (rows > 0) "\n" else "") + FAKE_TOKEN + GLOBAL_TOKEN)
    out.add(null)
    out.add(FAKE_TOKEN)
    return out
}

/** crops.idefics3_text_runs: the prompt text between the image's view slots (views + 1 strings; one string, the
 *  template without its marker, when ``grid`` is null). */
fun idefics3TextRuns(template: String, prompt: String, grid: Pair<Int, Int>?, marker: String = IMAGE_TOKEN): List<String> {
    if (grid == null || marker !in template) return listOf(template.replace(marker, "").replace("{prompt}", prompt))
    val head = template.substringBefore(marker).replace("{prompt}", prompt)
    val tail = template.substringAfter(marker).replace("{prompt}", prompt)
    val runs = ArrayList<String>()
    var cur = head
    for (piece in idefics3ImageText(grid.first, grid.second)) {
        if (piece == null) {
            runs.add(cur)
            cur = ""
        } else {
            cur += piece
        }
    }
    runs.add(cur + tail)
    return runs
}

/** VLMPipeline._prepare_tiles's id runs: each text run encoded on its own (an empty run gives no ids), ``bosId``
 *  (the prompt block's bos_id when bos is true) before the first. */
fun idefics3RunIds(runs: List<String>, bosId: Int?, encode: (String) -> List<Int>): List<List<Int>> {
    val ids = runs.map { if (it.isEmpty()) emptyList() else encode(it) }.toMutableList()
    if (bosId != null) ids[0] = listOf(bosId) + ids[0]
    return ids
}

/** VLMPipeline._prepare_tiles's assembly: [run 0 | view 0 | run 1 | ... | view V-1 | run V] (rows of D floats:
 *  each run's token embeddings, each view's image embeddings in its own slot). */
fun spliceViews(runs: List<FloatArray>, views: List<FloatArray>): FloatArray {
    if (runs.size != views.size + 1) throw BundleError("the prompt template has ${runs.size - 1} image slot(s) for " +
        "${views.size} view(s)", "re-export the bundle (its template needs one $IMAGE_TOKEN marker)")
    val out = FloatArray(runs.sumBy { it.size } + views.sumBy { it.size })
    var at = 0
    for (i in runs.indices) {
        if (i > 0) {
            System.arraycopy(views[i - 1], 0, out, at, views[i - 1].size)
            at += views[i - 1].size
        }
        System.arraycopy(runs[i], 0, out, at, runs[i].size)
        at += runs[i].size
    }
    return out
}

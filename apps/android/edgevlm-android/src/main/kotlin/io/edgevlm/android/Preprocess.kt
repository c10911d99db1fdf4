// Image preprocessing, step for step as edgevlm/processor.py (ImageSpec, resize_crop, normalize, preprocess_image)
// and Pillow's resampling (libImaging/Resample.c: precompute_coeffs, normalize_coeffs_8bpc, 8-bit horizontal and
// vertical passes; bilinear, bicubic, lanczos; Geometry.c for nearest), which Image.resize runs for the Python
// runtime. SmolVLM's idefics3_tiles layout is in Crops.kt. Pure Kotlin (no Android): the app hands in
// RGB bytes (VlmPipeline.kt reads them from a Bitmap); tests/test_apps_android.py compiles this file with kotlinc
// where one is installed and compares its output with preprocess_image's.
package io.edgevlm.android

import kotlin.math.abs
import kotlin.math.ceil

val CLIP_MEAN = floatArrayOf(0.48145466f, 0.4578275f, 0.40821073f)
val CLIP_STD = floatArrayOf(0.26862954f, 0.26130258f, 0.27577711f)

// edgevlm/data/images.py: the size limits load_image applies
const val MIN_SIDE = 8
const val MAX_SIDE = 16_384
const val MAX_PIXELS = 64_000_000L

/** processor.ImageSpec: the manifest's generation.image block. Crop, squash, pad and idefics3_tiles (SmolVLM,
 *  Crops.kt) are ported (Moondream2's overlap_crops is refused: see the README's limits). ``options``: the block's
 *  options (JSON values: Number, Boolean, String), read by the layout (idefics3Params). */
class ImageSpec(val size: Int, val mode: String = "crop", val interpolation: String = "bicubic",
                val mean: FloatArray = CLIP_MEAN, val std: FloatArray = CLIP_STD,
                val options: Map<String, Any> = emptyMap()) {
    init {
        if (interpolation !in INTERPOLATIONS) throw BundleError("unknown interpolation '$interpolation'",
            "use bilinear, bicubic or nearest")
        if (mode !in IMAGE_MODES) throw BundleError(
            "image mode '$mode' is an image layout edgevlm-android does not port (it runs ${IMAGE_MODES.joinToString()})",
            "use a bundle of a vision_encoder family")
        if (mean.size != 3 || std.size != 3) throw BundleError("image mean/std need 3 values", "re-export the bundle")
    }
}

/** An 8-bit RGB image: rgb[(y * width + x) * 3 + c]. */
class RgbImage(val width: Int, val height: Int, val rgb: IntArray) {
    init {
        require(rgb.size == width * height * 3) { "rgb holds ${rgb.size} values for $width x $height x 3" }
    }
}

/** data/images.py _check_size. */
fun checkSize(w: Int, h: Int, what: String) {
    if (w < MIN_SIDE || h < MIN_SIDE) throw ImageError("$what is ${w}x$h pixels, smaller than ${MIN_SIDE}x$MIN_SIDE",
        "use a larger image")
    if (w > MAX_SIDE || h > MAX_SIDE || w.toLong() * h > MAX_PIXELS) throw ImageError(
        "$what is ${w}x$h pixels, over the limit of ${MAX_PIXELS / 1_000_000} MP / $MAX_SIDE px a side",
        "downscale the image before passing it")
}

/** The image modes this port runs (processor's crop/squash/pad and crops.py's idefics3_tiles). */
val IMAGE_MODES = listOf("crop", "squash", "pad", "idefics3_tiles")
/** processor._RESAMPLE: the interpolations an ImageSpec may name (layouts name theirs in options.resample). */
val INTERPOLATIONS = listOf("bilinear", "bicubic", "nearest")

// -- Pillow's resampling -------------------------------------------------------------------------------------
private class Filter(val support: Double, val f: (Double) -> Double)

/** Pillow's sinc_filter: sin(pi x) / (pi x), 1 at 0. */
private fun sinc(x: Double): Double {
    if (x == 0.0) return 1.0
    val y = x * Math.PI
    return Math.sin(y) / y
}

private val FILTERS = mapOf(
    "bilinear" to Filter(1.0) { x -> val a = abs(x); if (a < 1.0) 1.0 - a else 0.0 },
    "bicubic" to Filter(2.0) { x ->                       // a = -0.5, as Pillow
        val a = -0.5
        val t = abs(x)
        when {
            t < 1.0 -> ((a + 2.0) * t - (a + 3.0)) * t * t + 1
            t < 2.0 -> (((t - 5) * t + 8) * t - 4) * a
            else -> 0.0
        }
    },
    "lanczos" to Filter(3.0) { x -> if (-3.0 <= x && x < 3.0) sinc(x) * sinc(x / 3) else 0.0 },   // truncated sinc
    "nearest" to Filter(0.0) { 0.0 })                     // resized by nearestResize, not by coefficients

private const val PRECISION_BITS = 32 - 8 - 2

private class Coeffs(val ksize: Int, val bounds: IntArray, val kk: IntArray)

private fun precomputeCoeffs(inSize: Int, outSize: Int, filter: Filter): Coeffs {
    val scale = inSize.toDouble() / outSize
    val filterscale = if (scale < 1.0) 1.0 else scale
    val support = filter.support * filterscale
    val ksize = ceil(support).toInt() * 2 + 1
    val pre = DoubleArray(outSize * ksize)
    val bounds = IntArray(outSize * 2)
    for (xx in 0 until outSize) {
        val center = (xx + 0.5) * scale
        var ww = 0.0
        val ss = 1.0 / filterscale
        var xmin = (center - support + 0.5).toInt()        // C's (int): truncation toward zero, as toInt()
        if (xmin < 0) xmin = 0
        var xmax = (center + support + 0.5).toInt()
        if (xmax > inSize) xmax = inSize
        xmax -= xmin
        for (x in 0 until xmax) {
            val w = filter.f((x + xmin - center + 0.5) * ss)
            pre[xx * ksize + x] = w
            ww += w
        }
        for (x in 0 until xmax) if (ww != 0.0) pre[xx * ksize + x] /= ww
        bounds[xx * 2] = xmin
        bounds[xx * 2 + 1] = xmax
    }
    val one = (1 shl PRECISION_BITS).toDouble()
    val kk = IntArray(pre.size) { i -> if (pre[i] < 0) (-0.5 + pre[i] * one).toInt() else (0.5 + pre[i] * one).toInt() }
    return Coeffs(ksize, bounds, kk)
}

private fun clip8(v: Int): Int = when {
    v >= (1 shl PRECISION_BITS shl 8) -> 255
    v <= 0 -> 0
    else -> v shr PRECISION_BITS
}

private fun horizontal(img: RgbImage, outW: Int, c: Coeffs): RgbImage {
    val out = IntArray(outW * img.height * 3)
    for (y in 0 until img.height) for (xx in 0 until outW) {
        val xmin = c.bounds[xx * 2]
        val xmax = c.bounds[xx * 2 + 1]
        for (ch in 0 until 3) {
            var ss = 1 shl (PRECISION_BITS - 1)
            for (x in 0 until xmax) ss += img.rgb[(y * img.width + x + xmin) * 3 + ch] * c.kk[xx * c.ksize + x]
            out[(y * outW + xx) * 3 + ch] = clip8(ss)
        }
    }
    return RgbImage(outW, img.height, out)
}

private fun vertical(img: RgbImage, outH: Int, c: Coeffs): RgbImage {
    val out = IntArray(img.width * outH * 3)
    for (yy in 0 until outH) {
        val ymin = c.bounds[yy * 2]
        val ymax = c.bounds[yy * 2 + 1]
        for (x in 0 until img.width) for (ch in 0 until 3) {
            var ss = 1 shl (PRECISION_BITS - 1)
            for (y in 0 until ymax) ss += img.rgb[((y + ymin) * img.width + x) * 3 + ch] * c.kk[yy * c.ksize + y]
            out[(yy * img.width + x) * 3 + ch] = clip8(ss)
        }
    }
    return RgbImage(img.width, outH, out)
}

/** Pillow's NEAREST resize (Geometry.c ImagingScaleAffine): source positions accumulated in doubles from
 *  scale * 0.5 in steps of scale, truncated (the accumulation, not (i + 0.5) * scale, decides the ties). */
private fun nearestResize(img: RgbImage, w: Int, h: Int): RgbImage {
    val out = IntArray(w * h * 3)
    val sx = img.width.toDouble() / w
    val sy = img.height.toDouble() / h
    val xin = IntArray(w)
    var xo = sx * 0.5
    for (x in 0 until w) { xin[x] = minOf(xo.toInt(), img.width - 1); xo += sx }
    var yo = sy * 0.5
    for (y in 0 until h) {
        val iy = minOf(yo.toInt(), img.height - 1)
        yo += sy
        for (x in 0 until w) for (ch in 0 until 3) out[(y * w + x) * 3 + ch] = img.rgb[(iy * img.width + xin[x]) * 3 + ch]
    }
    return RgbImage(w, h, out)
}

/** Image.resize((w, h), resample) for an RGB image. */
fun resize(img: RgbImage, w: Int, h: Int, interpolation: String): RgbImage {
    if (w == img.width && h == img.height) return img
    val filter = FILTERS[interpolation] ?: throw BundleError("unknown interpolation '$interpolation'",
        "use bilinear, bicubic, lanczos or nearest")
    if (interpolation == "nearest") return nearestResize(img, w, h)
    var out = img
    if (w != img.width) out = horizontal(out, w, precomputeCoeffs(img.width, w, filter))
    if (h != img.height) out = vertical(out, h, precomputeCoeffs(img.height, h, filter))
    return out
}

/** Image.crop((left, top, left + size, top + size)) inside the image. */
internal fun crop(img: RgbImage, left: Int, top: Int, size: Int): RgbImage {
    val out = IntArray(size * size * 3)
    for (y in 0 until size) for (x in 0 until size) for (ch in 0 until 3)
        out[(y * size + x) * 3 + ch] = img.rgb[((y + top) * img.width + x + left) * 3 + ch]
    return RgbImage(size, size, out)
}

/** processor.resize_crop: shorter side to size (the longer truncated), centre crop. */
fun resizeCrop(img: RgbImage, size: Int, interpolation: String): RgbImage {
    val w = img.width
    val h = img.height
    val short = if (w <= h) w else h
    val long = if (w <= h) h else w
    val newLong = ((size.toLong() * long).toDouble() / short).toInt()
    val nw = if (w <= h) size else newLong
    val nh = if (w <= h) newLong else size
    val resized = resize(img, nw, nh, interpolation)
    return crop(resized, Math.floorDiv(nw - size, 2), Math.floorDiv(nh - size, 2), size)
}

/** processor.pad_square: the image centred on a square of its longer side (offsets floor-halved), the border
 *  int(mean * 255) per channel. */
fun padSquare(img: RgbImage, mean: FloatArray): RgbImage {
    if (img.width == img.height) return img
    val side = maxOf(img.width, img.height)
    val fill = IntArray(3) { (mean[it].toDouble() * 255.0).toInt() }
    val out = IntArray(side * side * 3) { fill[it % 3] }
    val left = (side - img.width) / 2
    val top = (side - img.height) / 2
    for (y in 0 until img.height) for (x in 0 until img.width) for (ch in 0 until 3)
        out[((y + top) * side + x + left) * 3 + ch] = img.rgb[(y * img.width + x) * 3 + ch]
    return RgbImage(side, side, out)
}

/** processor.normalize: (H, W, 3) bytes -> (3, H, W) float32, / 255, minus mean, over std (float32 arithmetic). */
fun normalize(img: RgbImage, spec: ImageSpec): FloatArray {
    val hw = img.width * img.height
    val out = FloatArray(3 * hw)
    for (i in 0 until hw) for (ch in 0 until 3)
        out[ch * hw + i] = (img.rgb[i * 3 + ch].toFloat() / 255.0f - spec.mean[ch]) / spec.std[ch]
    return out
}

/** processor.preprocess_image: (views, 3, size, size) float32, flattened (one view for crop, squash and pad; the
 *  tiles and the global view for idefics3_tiles, whose grid idefics3TilesWithGrid also returns). */
fun preprocessImage(img: RgbImage, spec: ImageSpec): FloatArray {
    checkSize(img.width, img.height, "the image")
    return when (spec.mode) {
        "crop" -> normalize(resizeCrop(img, spec.size, spec.interpolation), spec)
        "idefics3_tiles" -> idefics3TilesWithGrid(img, spec).views
        "pad" -> normalize(resizeCrop(padSquare(img, spec.mean), spec.size, spec.interpolation), spec)
        else -> normalize(resize(img, spec.size, spec.size, spec.interpolation), spec)
    }
}

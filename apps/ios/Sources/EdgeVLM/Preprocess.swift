// Image preprocessing, step for step as edgevlm/processor.py (ImageSpec, resize_crop, normalize, preprocess_image),
// edgevlm/data/crops.py (Moondream2's overlap crops; SmolVLM's idefics3_tiles in Crops.swift) and Pillow's resampling (libImaging/Resample.c:
// precompute_coeffs, normalize_coeffs_8bpc, 8-bit horizontal then vertical passes; Geometry.c for NEAREST), which
// Image.resize runs for the Python runtime. Pure Swift (no Apple frameworks): the same arithmetic as
// apps/android's Preprocess.kt. tests/test_apps_ios.py checks its constants against the Python ones.
import Foundation

public let CLIP_MEAN: [Float] = [0.48145466, 0.4578275, 0.40821073]
public let CLIP_STD: [Float] = [0.26862954, 0.26130258, 0.27577711]

// edgevlm/data/images.py: the size limits load_image applies
public let MIN_SIDE = 8
public let MAX_SIDE = 16_384
public let MAX_PIXELS = 64_000_000
public let MAX_FILE_BYTES = 50 * 1024 * 1024

// edgevlm/data/crops.py OVERLAP_DEFAULTS (Moondream2's layout)
public let OVERLAP_PATCH_SIZE = 14
public let OVERLAP_MARGIN = 4
public let OVERLAP_MAX_CROPS = 12
public let OVERLAP_RESAMPLE = "lanczos"

/// processor.ImageSpec: the manifest's generation.image block (mode crop, squash, pad, overlap_crops or
/// idefics3_tiles). `options` holds the block's integer options, `resample` and `splitting` its other two.
public struct ImageSpec: Sendable {
    public let size: Int
    public let mode: String
    public let interpolation: String
    public let mean: [Float]
    public let std: [Float]
    public let options: [String: Int]
    public var resample: String = OVERLAP_RESAMPLE      // overlap_crops, idefics3_tiles: options.resample
    public var splitting: Bool = IDEFICS3_SPLITTING     // idefics3_tiles: options.splitting

    public init(size: Int, mode: String = "crop", interpolation: String = "bicubic", mean: [Float] = CLIP_MEAN,
                std: [Float] = CLIP_STD, options: [String: Int] = [:], resample: String = OVERLAP_RESAMPLE,
                splitting: Bool = IDEFICS3_SPLITTING) throws {
        guard ["bilinear", "bicubic", "nearest"].contains(interpolation) else {
            throw ConfigError("unknown interpolation '\(interpolation)'", "use bilinear, bicubic or nearest")
        }
        guard ["crop", "squash", "pad", "overlap_crops", "idefics3_tiles"].contains(mode) else {
            throw ConfigError("unknown image mode '\(mode)'", "use crop, squash, pad, overlap_crops or idefics3_tiles")
        }
        guard mean.count == 3, std.count == 3 else { throw BundleError("image mean/std need 3 values", REEXPORT) }
        self.size = size; self.mode = mode; self.interpolation = interpolation
        self.mean = mean; self.std = std; self.options = options; self.resample = resample; self.splitting = splitting
    }

    /// ImageSpec.from_dict
    public static func fromDict(_ d: JSON) throws -> ImageSpec {
        let w = "generation.image"
        let opts = (d["options"] as? JSON) ?? [:]
        var ints: [String: Int] = [:]
        for (k, v) in opts { if let n = v as? NSNumber, !isBool(n) { ints[k] = n.intValue } }
        let size = try jint(d, "size", w)
        var mean = CLIP_MEAN, std = CLIP_STD
        if jhas(d, "mean") { mean = try jdoubles(d, "mean", w).map(Float.init) }
        if jhas(d, "std") { std = try jdoubles(d, "std", w).map(Float.init) }
        return try ImageSpec(size: size, mode: (d["mode"] as? String) ?? "crop",
                             interpolation: (d["interpolation"] as? String) ?? "bicubic", mean: mean, std: std,
                             options: ints, resample: (opts["resample"] as? String) ?? OVERLAP_RESAMPLE,
                             splitting: (opts["splitting"] as? NSNumber)?.boolValue ?? IDEFICS3_SPLITTING)
    }
}

/// An 8-bit RGB image: rgb[(y * width + x) * 3 + c].
public struct RgbImage: Sendable {
    public let width: Int
    public let height: Int
    public var rgb: [UInt8]
    public init(width: Int, height: Int, rgb: [UInt8]) {
        precondition(rgb.count == width * height * 3, "rgb holds \(rgb.count) values for \(width) x \(height) x 3")
        self.width = width; self.height = height; self.rgb = rgb
    }
}

/// data/images.py _check_size
public func checkSize(_ w: Int, _ h: Int, _ what: String) throws {
    if w < MIN_SIDE || h < MIN_SIDE {
        throw ImageError("\(what) is \(w)x\(h) pixels, smaller than \(MIN_SIDE)x\(MIN_SIDE)", "use a larger image")
    }
    if w > MAX_SIDE || h > MAX_SIDE || w * h > MAX_PIXELS {
        throw ImageError("\(what) is \(w)x\(h) pixels, over the limit of \(MAX_PIXELS / 1_000_000) MP / \(MAX_SIDE) px a side",
                         "downscale the image before passing it")
    }
}

// -- Pillow's resampling ---------------------------------------------------------------------------------------------
struct Filter { let support: Double; let f: (Double) -> Double }

func sinc(_ x: Double) -> Double { x == 0 ? 1 : sin(x * Double.pi) / (x * Double.pi) }

let FILTERS: [String: Filter] = [
    "bilinear": Filter(support: 1) { x in let a = abs(x); return a < 1 ? 1 - a : 0 },
    "bicubic": Filter(support: 2) { x in                              // a = -0.5, as Pillow
        let a = -0.5, t = abs(x)
        if t < 1 { return ((a + 2) * t - (a + 3)) * t * t + 1 }
        if t < 2 { return (((t - 5) * t + 8) * t - 4) * a }
        return 0
    },
    "lanczos": Filter(support: 3) { x in (-3 <= x && x < 3) ? sinc(x) * sinc(x / 3) : 0 },
    "nearest": Filter(support: 0) { _ in 0 },                          // resized by nearestResize
]

let PRECISION_BITS = 32 - 8 - 2

struct Coeffs { let ksize: Int; let bounds: [Int]; let kk: [Int32] }

func precomputeCoeffs(_ inSize: Int, _ outSize: Int, _ filter: Filter) -> Coeffs {
    let scale = Double(inSize) / Double(outSize)
    let filterscale = scale < 1 ? 1 : scale
    let support = filter.support * filterscale
    let ksize = Int(ceil(support)) * 2 + 1
    var pre = [Double](repeating: 0, count: outSize * ksize)
    var bounds = [Int](repeating: 0, count: outSize * 2)
    for xx in 0..<outSize {
        let center = (Double(xx) + 0.5) * scale
        let ss = 1.0 / filterscale
        var xmin = Int(center - support + 0.5)                    // C's (int): truncation toward zero
        if xmin < 0 { xmin = 0 }
        var xmax = Int(center + support + 0.5)
        if xmax > inSize { xmax = inSize }
        xmax -= xmin
        var ww = 0.0
        for x in 0..<xmax {
            let w = filter.f((Double(x + xmin) - center + 0.5) * ss)
            pre[xx * ksize + x] = w
            ww += w
        }
        if ww != 0 { for x in 0..<xmax { pre[xx * ksize + x] /= ww } }
        bounds[xx * 2] = xmin
        bounds[xx * 2 + 1] = xmax
    }
    let one = Double(1 << PRECISION_BITS)
    let kk = pre.map { Int32($0 < 0 ? Int(-0.5 + $0 * one) : Int(0.5 + $0 * one)) }
    return Coeffs(ksize: ksize, bounds: bounds, kk: kk)
}

func clip8(_ v: Int) -> UInt8 {
    if v >= (1 << PRECISION_BITS) << 8 { return 255 }
    if v <= 0 { return 0 }
    return UInt8(v >> PRECISION_BITS)
}

func horizontal(_ img: RgbImage, _ outW: Int, _ c: Coeffs) -> RgbImage {
    var out = [UInt8](repeating: 0, count: outW * img.height * 3)
    for y in 0..<img.height {
        for xx in 0..<outW {
            let xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1]
            for ch in 0..<3 {
                var ss = 1 << (PRECISION_BITS - 1)
                for x in 0..<xmax { ss += Int(img.rgb[(y * img.width + x + xmin) * 3 + ch]) * Int(c.kk[xx * c.ksize + x]) }
                out[(y * outW + xx) * 3 + ch] = clip8(ss)
            }
        }
    }
    return RgbImage(width: outW, height: img.height, rgb: out)
}

func vertical(_ img: RgbImage, _ outH: Int, _ c: Coeffs) -> RgbImage {
    var out = [UInt8](repeating: 0, count: img.width * outH * 3)
    for yy in 0..<outH {
        let ymin = c.bounds[yy * 2], ymax = c.bounds[yy * 2 + 1]
        for x in 0..<img.width {
            for ch in 0..<3 {
                var ss = 1 << (PRECISION_BITS - 1)
                for y in 0..<ymax { ss += Int(img.rgb[((y + ymin) * img.width + x) * 3 + ch]) * Int(c.kk[yy * c.ksize + y]) }
                out[(yy * img.width + x) * 3 + ch] = clip8(ss)
            }
        }
    }
    return RgbImage(width: img.width, height: outH, rgb: out)
}

/// Pillow's NEAREST resize (Geometry.c ImagingScaleAffine): source positions accumulated in doubles from scale * 0.5
/// in steps of scale, truncated.
func nearestResize(_ img: RgbImage, _ w: Int, _ h: Int) -> RgbImage {
    var out = [UInt8](repeating: 0, count: w * h * 3)
    let sx = Double(img.width) / Double(w), sy = Double(img.height) / Double(h)
    var xin = [Int](repeating: 0, count: w)
    var xo = sx * 0.5
    for x in 0..<w { xin[x] = min(Int(xo), img.width - 1); xo += sx }
    var yo = sy * 0.5
    for y in 0..<h {
        let iy = min(Int(yo), img.height - 1)
        yo += sy
        for x in 0..<w { for ch in 0..<3 { out[(y * w + x) * 3 + ch] = img.rgb[(iy * img.width + xin[x]) * 3 + ch] } }
    }
    return RgbImage(width: w, height: h, rgb: out)
}

/// Image.resize((w, h), resample) for an RGB image.
public func resize(_ img: RgbImage, _ w: Int, _ h: Int, _ interpolation: String) throws -> RgbImage {
    if w == img.width && h == img.height { return img }
    guard let filter = FILTERS[interpolation] else {
        throw ConfigError("unknown interpolation '\(interpolation)'", "use bilinear, bicubic, lanczos or nearest")
    }
    if interpolation == "nearest" { return nearestResize(img, w, h) }
    var out = img
    if w != img.width { out = horizontal(out, w, precomputeCoeffs(img.width, w, filter)) }
    if h != img.height { out = vertical(out, h, precomputeCoeffs(img.height, h, filter)) }
    return out
}

/// Image.crop((left, top, left + size, top + size)); pixels outside the image are 0 (as Pillow's crop).
func crop(_ img: RgbImage, _ left: Int, _ top: Int, _ size: Int) -> RgbImage {
    var out = [UInt8](repeating: 0, count: size * size * 3)
    for y in 0..<size where y + top >= 0 && y + top < img.height {
        for x in 0..<size where x + left >= 0 && x + left < img.width {
            for ch in 0..<3 { out[(y * size + x) * 3 + ch] = img.rgb[((y + top) * img.width + x + left) * 3 + ch] }
        }
    }
    return RgbImage(width: size, height: size, rgb: out)
}

/// processor.resize_crop: shorter side to size (the longer truncated), centre crop.
public func resizeCrop(_ img: RgbImage, _ size: Int, _ interpolation: String) throws -> RgbImage {
    let w = img.width, h = img.height
    let short = min(w, h), long = w <= h ? h : w
    let newLong = Int(Double(size * long) / Double(short))
    let nw = w <= h ? size : newLong, nh = w <= h ? newLong : size
    let resized = try resize(img, nw, nh, interpolation)
    return crop(resized, (nw - size) / 2, (nh - size) / 2, size)          // both >= 0: Python's // is /
}

/// processor.pad_square: the image centred on a square of its longer side (offsets floor-halved), the border
/// int(mean * 255) per channel.
public func padSquare(_ img: RgbImage, _ mean: [Float]) -> RgbImage {
    if img.width == img.height { return img }
    let side = max(img.width, img.height)
    let fill = (0..<3).map { UInt8(Int(Double(mean[$0]) * 255.0)) }
    var out = [UInt8](repeating: 0, count: side * side * 3)
    for i in 0..<(side * side) { for ch in 0..<3 { out[i * 3 + ch] = fill[ch] } }
    let left = (side - img.width) / 2, top = (side - img.height) / 2
    for y in 0..<img.height {
        for x in 0..<img.width {
            for ch in 0..<3 { out[((y + top) * side + x + left) * 3 + ch] = img.rgb[(y * img.width + x) * 3 + ch] }
        }
    }
    return RgbImage(width: side, height: side, rgb: out)
}

/// processor.normalize: (H, W, 3) bytes -> (3, H, W) float32, / 255, minus mean, over std (float32 arithmetic).
public func normalize(_ img: RgbImage, _ spec: ImageSpec) -> [Float] {
    let hw = img.width * img.height
    var out = [Float](repeating: 0, count: 3 * hw)
    for i in 0..<hw {
        for ch in 0..<3 { out[ch * hw + i] = (Float(img.rgb[i * 3 + ch]) / Float(255.0) - spec.mean[ch]) / spec.std[ch] }
    }
    return out
}

/// processor.preprocess_image: (views, 3, size, size) float32, flattened (one view for crop, squash and pad).
public func preprocessImage(_ img: RgbImage, _ spec: ImageSpec) throws -> [Float] {
    try checkSize(img.width, img.height, "the image")
    switch spec.mode {
    case "crop": return normalize(try resizeCrop(img, spec.size, spec.interpolation), spec)
    case "pad": return normalize(try resizeCrop(padSquare(img, spec.mean), spec.size, spec.interpolation), spec)
    case "squash": return normalize(try resize(img, spec.size, spec.size, spec.interpolation), spec)
    case "idefics3_tiles": return try idefics3TilesWithGrid(img, spec).views
    default: return try overlapCropsWithGrid(img, spec).views
    }
}

// -- Moondream2's overlapping crops (data/crops.py) -------------------------------------------------------------------
/// crops.select_tiling: (rows, cols) of window-sized tiles, at most maxCrops.
public func selectTiling(_ height: Int, _ width: Int, _ window: Int, _ maxCrops: Int) -> (Int, Int) {
    if height <= window || width <= window { return (1, 1) }
    let needH = Int(ceil(Double(height) / Double(window))), needW = Int(ceil(Double(width) / Double(window)))
    if needH * needW > maxCrops {
        let shrink = (Double(maxCrops) / Double(needH * needW)).squareRoot()
        return (max(1, Int(floor(Double(needH) * shrink))), max(1, Int(floor(Double(needW) * shrink))))
    }
    var rows = max(Int(floor((Double(maxCrops) * Double(height) / Double(width)).squareRoot())), needH)
    var cols = max(Int(floor((Double(maxCrops) * Double(width) / Double(height)).squareRoot())), needW)
    if rows * cols > maxCrops {
        if cols > rows { cols = Int(floor(Double(maxCrops) / Double(rows))) } else { rows = Int(floor(Double(maxCrops) / Double(cols))) }
    }
    return (max(1, rows), max(1, cols))
}

func windowAndMargin(_ cropSize: Int, _ patchSize: Int, _ overlapMargin: Int) throws -> (Int, Int) {
    let patches = cropSize / patchSize
    if patches * patchSize != cropSize || patches <= 2 * overlapMargin {
        throw ConfigError("crop size \(cropSize) with patch \(patchSize) and margin \(overlapMargin) patches leaves no crop window",
                          "use a crop size that is a multiple of the patch size and more than 2 * overlap_margin patches wide")
    }
    return ((patches - 2 * overlapMargin) * patchSize, overlapMargin * patchSize)
}

/// crops.overlap_crops_with_grid: (1 + rows*cols, 3, S, S) float32 views flattened (global first, then crops
/// row-major) and (rows, cols).
public func overlapCropsWithGrid(_ img: RgbImage, _ spec: ImageSpec) throws -> (views: [Float], grid: (Int, Int)) {
    let size = spec.size
    let patch = spec.options["patch_size"] ?? OVERLAP_PATCH_SIZE
    let om = spec.options["overlap_margin"] ?? OVERLAP_MARGIN
    let maxCrops = spec.options["max_crops"] ?? OVERLAP_MAX_CROPS
    let (window, margin) = try windowAndMargin(size, patch, om)
    let (rows, cols) = selectTiling(img.height - 2 * margin, img.width - 2 * margin, window, maxCrops)
    let big = try resize(img, cols * window + 2 * margin, rows * window + 2 * margin, spec.resample)
    var views = normalize(try resize(img, size, size, spec.resample), spec)
    for r in 0..<rows {
        for c in 0..<cols { views += normalize(crop(big, c * window, r * window, size), spec) }
    }
    return (views, (rows, cols))
}

/// vlm_ops.merge_crops_numpy: (V, N, C) tower features (global view first) -> (N, 2C) = [global | local crops
/// stitched without inner margins and average-pooled (torch's adaptive bins) back to side x side].
public func mergeCrops(_ feats: [Float], views v: Int, n: Int, c: Int, grid: (Int, Int), side s: Int, margin m: Int) throws -> [Float] {
    let (rows, cols) = grid
    if rows * cols != v - 1 || n != s * s {
        throw BundleError("\(v) views of \(n) features do not make a global view plus a \(rows)x\(cols) grid of \(s)x\(s) crops", REEXPORT)
    }
    let step = s - 2 * m
    let H = rows * step + 2 * m, W = cols * step + 2 * m
    var out = [Float](repeating: 0, count: H * W * c)
    for r in 0..<rows {
        let y0 = r == 0 ? 0 : m, y1 = r == rows - 1 ? s : s - m
        for q in 0..<cols {
            let x0 = q == 0 ? 0 : m, x1 = q == cols - 1 ? s : s - m
            let tile = 1 + r * cols + q
            for y in y0..<y1 {
                for x in x0..<x1 {
                    let src = (tile * n + y * s + x) * c, dst = ((r * step + y) * W + q * step + x) * c
                    for k in 0..<c { out[dst + k] = feats[src + k] }
                }
            }
        }
    }
    func bins(_ length: Int) -> [(Int, Int)] { (0..<s).map { i in ((i * length) / s, ((i + 1) * length + s - 1) / s) } }
    let bh = bins(H), bw = bins(W)
    var merged = [Float](repeating: 0, count: n * 2 * c)
    for i in 0..<s {
        for j in 0..<s {
            let (h0, h1) = bh[i], (w0, w1) = bw[j]
            let scale = Float(1.0) / Float(h1 - h0) * (Float(1.0) / Float(w1 - w0))
            let row = (i * s + j) * 2 * c
            for k in 0..<c { merged[row + k] = feats[(i * s + j) * c + k] }          // the global view
            for h in h0..<h1 { for w in w0..<w1 { for k in 0..<c { merged[row + c + k] += out[(h * W + w) * c + k] * scale } } }
        }
    }
    return merged
}

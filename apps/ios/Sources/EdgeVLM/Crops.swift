// SmolVLM / Idefics3 tiles (image.mode idefics3_tiles), step for step as edgevlm/data/crops.py (idefics3_params,
// _fit_longest, _tile_multiple, idefics3_grid, idefics3_tiles_with_grid, idefics3_image_text, idefics3_text_runs) and
// the id runs of runtime/vlm.py's VLMPipeline._prepare_tiles; the same arithmetic and names as apps/android's Crops.kt
// (which tests/test_apps_android.py checks bit for bit against Python where kotlinc is installed). Every resize is
// Preprocess.swift's port of Pillow's (LANCZOS included). Pure Swift, Foundation only; not compiled here (no Swift
// toolchain): see the README.
import Foundation

// data/crops.py IDEFICS3_DEFAULTS, IDEFICS3_MAX_SIDE and the processor's tokens
public let IDEFICS3_LONGEST_EDGE = 2048
public let IDEFICS3_SPLITTING = true
public let IDEFICS3_RESAMPLE = "lanczos"
public let IDEFICS3_MAX_SIDE = 4096
public let FAKE_TOKEN = "<fake_token_around_image>"
public let GLOBAL_TOKEN = "<global-img>"
public let IMAGE_TOKEN = "<image>"
/// crops._RESAMPLE: the filters an image layout may name in options.resample.
public let LAYOUT_RESAMPLE = ["lanczos", "bicubic", "bilinear"]

/// crops.idefics3_params: the tile size and the layout options with IDEFICS3_DEFAULTS filled in.
public struct Idefics3Params: Sendable {
    public let size: Int
    public let longestEdge: Int
    public let splitting: Bool
    public let resample: String
}

public func idefics3Params(_ spec: ImageSpec) throws -> Idefics3Params {
    let longest = spec.options["longest_edge"] ?? IDEFICS3_LONGEST_EDGE
    guard longest >= 1 else {
        throw BundleError("generation.image.options.longest_edge is \(longest), not a positive number", "re-export the bundle")
    }
    guard LAYOUT_RESAMPLE.contains(spec.resample) else {
        throw BundleError("generation.image.options.resample is '\(spec.resample)'",
                          "use one of: \(LAYOUT_RESAMPLE.joined(separator: ", "))")
    }
    return Idefics3Params(size: spec.size, longestEdge: longest, splitting: spec.splitting, resample: spec.resample)
}

/// crops._fit_longest: (height, width) with the longest side `longest`, the other truncated then rounded up to even,
/// then both capped at IDEFICS3_MAX_SIDE (the processor's two-step rule).
public func fitLongest(_ height: Int, _ width: Int, _ longest: Int) -> (Int, Int) {
    var h = height, w = width
    var aspect = Double(w) / Double(h)
    if w >= h {
        w = longest
        h = Int(Double(longest) / aspect)                 // Python's int(): truncation toward zero
        h += h % 2
    } else {
        h = longest
        w = Int(Double(longest) * aspect)
        w += w % 2
    }
    h = max(h, 1); w = max(w, 1)
    aspect = Double(w) / Double(h)
    if w >= h && w > IDEFICS3_MAX_SIDE {
        w = IDEFICS3_MAX_SIDE; h = Int(Double(IDEFICS3_MAX_SIDE) / aspect)
    } else if h > w && h > IDEFICS3_MAX_SIDE {
        h = IDEFICS3_MAX_SIDE; w = Int(Double(IDEFICS3_MAX_SIDE) * aspect)
    }
    return (max(h, 1), max(w, 1))
}

/// crops._tile_multiple: (height, width) rounded up to multiples of `size`, the shorter side following the aspect.
public func tileMultiple(_ height: Int, _ width: Int, _ size: Int) -> (Int, Int) {
    var h = height, w = width
    let aspect = Double(w) / Double(h)
    if w >= h {
        w = Int(ceil(Double(w) / Double(size))) * size
        h = Int(ceil(Double(Int(Double(w) / aspect)) / Double(size))) * size
    } else {
        h = Int(ceil(Double(h) / Double(size))) * size
        w = Int(ceil(Double(Int(Double(h) * aspect)) / Double(size))) * size
    }
    return (h, w)
}

/// crops.idefics3_grid: (rows, cols) of tiles for an image of (height, width) pixels; (0, 0): one global view only.
public func idefics3Grid(_ height: Int, _ width: Int, _ p: Idefics3Params) -> (Int, Int) {
    if !p.splitting { return (0, 0) }
    let (fh, fw) = fitLongest(height, width, p.longestEdge)
    let (h, w) = tileMultiple(fh, fw, p.size)
    return h > p.size || w > p.size ? (h / p.size, w / p.size) : (0, 0)
}

/// idefics3TilesWithGrid's result: (views, 3, size, size) float32 flattened, the view count and (rows, cols).
public struct TilesWithGrid {
    public let views: [Float]
    public let count: Int
    public let grid: (Int, Int)
}

/// The tiles' normalization: x * (1/255) in float64, cast to float32, then (x - mean) / std in float32.
func idefics3Normalize(_ img: RgbImage, _ spec: ImageSpec) -> [Float] {
    let hw = img.width * img.height
    let scale = 1.0 / 255.0
    var out = [Float](repeating: 0, count: 3 * hw)
    for i in 0..<hw {
        for ch in 0..<3 { out[ch * hw + i] = (Float(Double(img.rgb[i * 3 + ch]) * scale) - spec.mean[ch]) / spec.std[ch] }
    }
    return out
}

/// crops.idefics3_tiles_with_grid (what VLMPipeline._prepare_tiles runs on load_image's RGB): the views (tiles
/// row-major, then the global view) and the (rows, cols) grid.
public func idefics3TilesWithGrid(_ img: RgbImage, _ spec: ImageSpec) throws -> TilesWithGrid {
    try checkSize(img.width, img.height, "the image")      // load_image's limits
    let p = try idefics3Params(spec)
    let size = p.size
    var (h, w) = fitLongest(img.height, img.width, p.longestEdge)
    var im = try resize(img, w, h, p.resample)
    if p.splitting {
        (h, w) = tileMultiple(h, w, size)
        im = try resize(im, w, h, p.resample)
    }
    let split = p.splitting && (h > size || w > size)
    let rows = split ? h / size : 0, cols = split ? w / size : 0
    var views: [Float] = []
    views.reserveCapacity((rows * cols + 1) * 3 * size * size)
    for r in 0..<rows {
        for c in 0..<cols { views += idefics3Normalize(crop(im, c * size, r * size, size), spec) }
    }
    let global = try (h, w) != (size, size) ? resize(im, size, size, p.resample) : im
    views += idefics3Normalize(global, spec)
    return TilesWithGrid(views: views, count: rows * cols + 1, grid: (rows, cols))
}

/// crops.idefics3_image_text: the processor's text for one image with each view's slot as nil (text, nil, ...).
public func idefics3ImageText(_ rows: Int, _ cols: Int) -> [String?] {
    var out: [String?] = []
    for r in 0..<rows {
        for c in 0..<cols {
            out.append("\(FAKE_TOKEN)<row_\(r + 1)_col_\(c + 1)>")
            out.append(nil)
        }
        out.append("\n")
    }
    out.append((rows > 0 ? "\n" : "") + FAKE_TOKEN + GLOBAL_TOKEN)
    out.append(nil)
    out.append(FAKE_TOKEN)
    return out
}

/// crops.idefics3_text_runs: the prompt text between the image's view slots (views + 1 strings; one string, the
/// template without its marker, when `grid` is nil).
public func idefics3TextRuns(_ template: String, _ prompt: String, _ grid: (Int, Int)?, marker: String = IMAGE_TOKEN) -> [String] {
    guard let grid, let r = template.range(of: marker) else {
        return [template.replacingOccurrences(of: marker, with: "").replacingOccurrences(of: "{prompt}", with: prompt)]
    }
    let head = String(template[..<r.lowerBound]).replacingOccurrences(of: "{prompt}", with: prompt)
    let tail = String(template[r.upperBound...]).replacingOccurrences(of: "{prompt}", with: prompt)
    var runs: [String] = [], cur = head
    for piece in idefics3ImageText(grid.0, grid.1) {
        if let piece { cur += piece } else { runs.append(cur); cur = "" }
    }
    runs.append(cur + tail)
    return runs
}

/// VLMPipeline._prepare_tiles's id runs: each text run encoded on its own (an empty run gives no ids), `bosId` (the
/// tokenizer's bos id when the prompt block's bos is true) before the first.
public func idefics3RunIds(_ runs: [String], bosId: Int?, _ encode: (String) throws -> [Int]) rethrows -> [[Int]] {
    var ids = try runs.map { try $0.isEmpty ? [] : encode($0) }
    if let bosId { ids[0] = [bosId] + ids[0] }
    return ids
}

/// VLMPipeline._prepare_tiles's assembly: [run 0 | view 0 | run 1 | ... | view V-1 | run V] (rows of D floats).
public func spliceViews(_ runs: [[Float]], _ views: [[Float]]) throws -> [Float] {
    guard runs.count == views.count + 1 else {
        throw BundleError("the prompt template has \(runs.count - 1) image slot(s) for \(views.count) view(s)",
                          "re-export the bundle (its template needs one \(IMAGE_TOKEN) marker)")
    }
    var out = runs[0]
    for (v, view) in views.enumerated() { out += view; out += runs[v + 1] }
    return out
}

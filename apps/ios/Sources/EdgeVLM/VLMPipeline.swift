// edgevlm/runtime/vlm.py's VLMPipeline on Core ML: the vision parts (.mlpackage, compiled on first load), the token
// embedding table (embed_tokens.f16, read without a model), the stateful decoder (one MLState per conversation) and
// the bundle's tokenizer.json through swift-transformers' Tokenizers. Same names as the Python runtime in camelCase
// (README: the mapping table). Not compiled or run anywhere: see the README.
import CoreGraphics
import CoreML
import CryptoKit
import Foundation
import Hub
import ImageIO
import Tokenizers

public let IMAGE_MARKER = "<image>"
/// The inputs each part is fed (vlm.PART_INPUTS; the names are the ONNX parts').
public let PART_INPUTS: [String: [String]] = ["vision_encoder": ["pixel_values"], "vision_tower": ["pixel_values"],
                                              "vision_projector": ["merged_features"]]
public let PART_OUTPUTS: [String: String] = ["vision_encoder": "image_embeds", "vision_tower": "image_features",
                                             "vision_projector": "image_embeds"]
public let DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids"]

// -- Core ML helpers ------------------------------------------------------------------------------------------------
/// A float32 MLMultiArray of ``shape`` holding ``values`` (row-major).
func multiArray(_ values: [Float], _ shape: [Int]) throws -> MLMultiArray {
    let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
    a.withUnsafeMutableBufferPointer(ofType: Float.self) { ptr, _ in
        for i in 0..<values.count { ptr[i] = values[i] }                 // a new array is contiguous
    }
    return a
}

func multiArray(_ values: [Int32], _ shape: [Int]) throws -> MLMultiArray {
    let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
    a.withUnsafeMutableBufferPointer(ofType: Int32.self) { ptr, _ in
        for i in 0..<values.count { ptr[i] = values[i] }
    }
    return a
}

/// An output's values in row-major order whatever its strides (MLShapedArray copies them out logically).
func floats(_ a: MLMultiArray) -> [Float] {
    switch a.dataType {
    case .float16: return MLShapedArray<Float16>(a).scalars.map { Float($0) }
    case .double: return MLShapedArray<Double>(a).scalars.map { Float($0) }
    default: return MLShapedArray<Float>(a).scalars
    }
}

/// runtime.coreml.CoreMLGraph (vlm._Graph for Core ML): one compiled part; refuses a model without the inputs the runtime feeds.
public final class CoreMLGraph: @unchecked Sendable {
    public let name: String
    public let url: URL
    public let model: MLModel

    init(name: String, url: URL, model: MLModel, expect: [String]) throws {
        self.name = name; self.url = url; self.model = model
        let have = Set(model.modelDescription.inputDescriptionsByName.keys)
        let missing = expect.filter { !have.contains($0) }
        if !missing.isEmpty {
            throw BundleError("\(url.lastPathComponent) is not the model part \(name) needs: it lacks the input(s) "
                + "\(missing.prefix(4).joined(separator: ", ")) (it takes \(have.sorted().prefix(4).joined(separator: ", ")))", REEXPORT)
        }
    }

    /// One prediction; ``output``'s values and shape.
    func run(_ inputs: [String: MLMultiArray], output: String, state: MLState? = nil) throws -> (values: [Float], shape: [Int]) {
        do {
            let provider = try MLDictionaryFeatureProvider(dictionary: inputs.mapValues { MLFeatureValue(multiArray: $0) })
            let out = try state.map { try model.prediction(from: provider, using: $0) } ?? model.prediction(from: provider)
            guard let a = out.featureValue(for: output)?.multiArrayValue else {
                throw BundleError("\(url.lastPathComponent) has no \(output) output", REEXPORT)
            }
            return (floats(a), a.shape.map { $0.intValue })
        } catch let e as EdgeVLMError { throw e } catch {
            throw BundleError("Core ML failed running \(url.lastPathComponent): \(String(describing: error).prefix(160))",
                              "re-export the bundle with `edgevlm export --target ios`; if it persists, report it")
        }
    }
}

/// Compile an .mlpackage for this device (MLModel.compileModel(at:)) once, and keep the .mlmodelc in Caches keyed by
/// the package's checksums; later loads open the cached copy.
func loadPart(_ b: VLMBundle, _ name: String, _ config: MLModelConfiguration) async throws -> CoreMLGraph {
    let (_, url) = try b.part(name)
    let listed = (b.manifest["files"] as? JSON) ?? [:]
    let rel = url.path.replacingOccurrences(of: b.root.path + "/", with: "")
    let sums = listed.keys.filter { $0.hasPrefix(rel + "/") }.sorted().compactMap { (listed[$0] as? JSON)?["sha256"] as? String }
    var h = SHA256Hasher()
    for s in sums { h.update(s) }
    let caches = FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask)[0].appendingPathComponent("edgevlm")
    let cached = caches.appendingPathComponent("\(name)-\(h.hex).mlmodelc")
    if !FileManager.default.fileExists(atPath: cached.path) {
        let compiled = try await MLModel.compileModel(at: url)          // a temporary location
        try FileManager.default.createDirectory(at: caches, withIntermediateDirectories: true)
        try? FileManager.default.removeItem(at: cached)
        try FileManager.default.moveItem(at: compiled, to: cached)
    }
    let model = try MLModel(contentsOf: cached, configuration: config)
    return try CoreMLGraph(name: name, url: url, model: model, expect: PART_INPUTS[name] ?? (name == "decoder_coreml" ? DECODER_INPUTS : []))
}

/// runtime.coreml.RawEmbedding: the token embedding table (embed_tokens.f16, or .f32 in FP32 bundles): (vocab,
/// hidden) float16 or float32, little-endian, row-major, memory-mapped, looked up by id without a model.
public final class RawEmbedding: @unchecked Sendable {
    public let vocab: Int
    public let hidden: Int
    let bytes: Int                       // 2 (float16) or 4 (float32)
    let data: Data

    init(_ b: VLMBundle) throws {
        let (rec, url) = try b.part("embed_tokens")
        let w = "parts.embed_tokens.details"
        let d = try jobj(rec, "details", "part embed_tokens")
        let shape = try jints(d, "shape", w)
        let dtype = try jstr(d, "dtype", w)
        let order = try jstr(d, "byte_order", w)
        if (rec["format"] as? String) != "raw" || order != "little" || shape.count != 2 || !["float16", "float32"].contains(dtype) {
            throw BundleError("part embed_tokens is not a raw little-endian float16/float32 (vocab, hidden) table", REEXPORT)
        }
        vocab = shape[0]; hidden = shape[1]; bytes = dtype == "float16" ? 2 : 4
        data = try Data(contentsOf: url, options: .alwaysMapped)
        if data.count != vocab * hidden * bytes {
            throw BundleError("\(url.lastPathComponent) holds \(data.count) bytes, not the \(vocab * hidden * bytes) of a "
                + "\(dtype) \(vocab)x\(hidden) table", "copy the whole bundle directory again, or re-export")
        }
    }

    /// VLMPipeline.embed_ids: the rows of ``ids`` concatenated (len(ids) * hidden floats).
    public func rows(_ ids: [Int]) throws -> [Float] {
        var out = [Float](); out.reserveCapacity(ids.count * hidden)
        try data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            for id in ids {
                if id < 0 || id >= vocab {
                    throw BundleError("token id \(id) is outside the embedding table (\(vocab) rows)", "use the bundle's own tokenizer.json")
                }
                for j in 0..<hidden {
                    let at = (id * hidden + j) * bytes
                    if bytes == 2 {
                        out.append(Float(Float16(bitPattern: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt16.self)))))
                    } else {
                        out.append(Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: at, as: UInt32.self))))
                    }
                }
            }
        }
        return out
    }
}

/// runtime.coreml.CoreMLDecoder, the stateful decoder (the Core ML counterpart of vlm.OrtDecoder): inputs_embeds (1, S, D) + additive mask
/// (1, 1, S, P+S) + position_ids (1, S) int32, KV cache in the model's states (key_cache, value_cache), logits (1, V)
/// of the last position. P = positions already in the state; one MLState per conversation (reset()).
public final class CoreMLDecoder: @unchecked Sendable {
    public let name = "coreml"
    let part: CoreMLGraph
    let embed: RawEmbedding
    public let contextLength: Int
    public let maxPrefill: Int
    public private(set) var nPast = 0
    var state: MLState

    init(_ part: CoreMLGraph, _ embed: RawEmbedding, details: JSON) throws {
        self.part = part; self.embed = embed
        let w = "parts.decoder_coreml.details"
        contextLength = try jint(details, "context_length", w)
        maxPrefill = try jint(details, "max_prefill", w)
        let states = try jobj(details, "states", w)
        let have = part.model.modelDescription.stateDescriptionsByName
        let missing = states.keys.filter { have[$0] == nil }.sorted()
        if !missing.isEmpty || states.isEmpty {
            throw BundleError("\(part.url.lastPathComponent) is not the stateful decoder the manifest describes (states "
                + "\(missing.joined(separator: ", ")) missing)", REEXPORT)
        }
        if part.model.modelDescription.outputDescriptionsByName["logits"] == nil {
            throw BundleError("\(part.url.lastPathComponent) has no logits output", REEXPORT)
        }
        state = part.model.makeState()
    }

    /// A fresh state: the KV cache starts empty (zeros) for the next conversation.
    public func reset() { state = part.model.makeState(); nPast = 0 }

    func run(_ embeds: [Float], _ s: Int, _ prefix: Int) throws -> [Float] {
        let d = embeds.count / max(s, 1), total = nPast + s
        if total > contextLength {
            throw ConfigError("the sequence reached \(total) positions, the decoder's KV cache holds \(contextLength)",
                              "shorten the prompt or ask for fewer tokens")
        }
        let inputs = ["inputs_embeds": try multiArray(embeds, [1, s, d]),
                      "attention_mask": try multiArray(attentionMask(s, nPast, nPast == 0 ? prefix : 0), [1, 1, s, total]),
                      "position_ids": try multiArray((nPast..<total).map { Int32($0) }, [1, s])]
        let out = try part.run(inputs, output: "logits", state: state)
        nPast = total
        return out.values
    }

    /// (S, D) embeddings -> (V,) logits of the last position; prompts longer than max_prefill go in chunks.
    public func prefill(_ embeds: [Float], _ s: Int, _ prefix: Int = 0) throws -> [Float] {
        if prefix > maxPrefill {
            throw ConfigError("the image prefix takes \(prefix) positions, the decoder's prefill takes \(maxPrefill) at once",
                              "re-export with a larger prefill range")
        }
        let d = embeds.count / max(s, 1)
        var logits: [Float] = []
        var start = 0
        while start < s {
            let n = min(maxPrefill, s - start)
            logits = try run(Array(embeds[(start * d)..<((start + n) * d)]), n, prefix)
            start += n
        }
        return logits
    }

    public func step(_ token: Int) throws -> [Float] { try run(try embed.rows([token]), 1, 0) }
}

/// processor.TextTokenizer on tokenizer.json through swift-transformers (add_special_tokens=False;
/// decode skips special tokens; no clean-up of spaces, as the tokenizers package).
public final class TextTokenizer: @unchecked Sendable {
    let tok: any Tokenizer
    public let bosId: Int?

    init(_ url: URL, bosId: Int?) throws {
        self.bosId = bosId
        do {
            guard let data = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [NSString: Any] else {
                throw BundleError("\(url.path) is not a JSON object", REEXPORT)
            }
            let type = ((data["model"] as? JSON)?["type"] as? String) ?? "BPE"
            let cls = ["BPE": "PreTrainedTokenizer", "Unigram": "XLMRobertaTokenizer", "WordPiece": "BertTokenizer"][type]
            guard let cls else { throw BundleError("\(url.path) holds a \(type) tokenizer, which swift-transformers does not read", REEXPORT) }
            let config: [NSString: Any] = ["tokenizer_class": cls, "clean_up_tokenization_spaces": false]
            tok = try AutoTokenizer.from(tokenizerConfig: Config(config), tokenizerData: Config(data))
        } catch let e as EdgeVLMError { throw e } catch {
            throw BundleError("\(url.path) is not a tokenizer swift-transformers can read: \(String(describing: error).prefix(120))", REEXPORT)
        }
    }

    public func encode(_ text: String) throws -> [Int] {
        try checkPrompt(text)
        return text.isEmpty ? [] : tok.encode(text: text, addSpecialTokens: false)
    }

    public func decode(_ ids: [Int]) -> String { tok.decode(tokens: ids, skipSpecialTokens: true) }
}

/// processor.PromptPieces
public struct PromptPieces: Sendable {
    public let before: [Int]
    public let after: [Int]
    public let hasImage: Bool
    public var nText: Int { before.count + after.count }
}

/// VLMPipeline.prepare's result: inputs_embeds (1, length, hidden) flattened, image tokens, bidirectional prefix.
public struct Prepared: Sendable {
    public let embeds: [Float]
    public let length: Int
    public let pieces: PromptPieces
    public let imageTokens: Int
    public let prefix: Int
}

// -- images ---------------------------------------------------------------------------------------------------------
/// data.images.load_image: decode image bytes to 8-bit RGB as Pillow's convert("RGB") does where Image I/O allows
/// (no EXIF rotation, alpha dropped, the same size limits, checked before decoding).
public func loadImage(_ data: Data, what: String = "image") throws -> RgbImage {
    if data.count > MAX_FILE_BYTES { throw ImageError("\(what) is over \(MAX_FILE_BYTES >> 20) MiB", "use a smaller image file") }
    guard let src = CGImageSourceCreateWithData(data as CFData, nil), CGImageSourceGetCount(src) > 0,
          let props = CGImageSourceCopyPropertiesAtIndex(src, 0, nil) as? [CFString: Any],
          let w = props[kCGImagePropertyPixelWidth] as? Int, let h = props[kCGImagePropertyPixelHeight] as? Int else {
        throw ImageError("\(what) is not a decodable image", "pass a complete PNG, JPEG, HEIC or WebP file (re-save it)")
    }
    try checkSize(w, h, what)
    guard let cg = CGImageSourceCreateImageAtIndex(src, 0, nil) else {
        throw ImageError("\(what) is not a decodable image", "pass a complete PNG, JPEG, HEIC or WebP file (re-save it)")
    }
    return try rgbOf(cg)
}

/// A CGImage's pixels as 8-bit RGB. 8-bit RGB(A/X) and gray(+alpha) images with unpremultiplied or no alpha are read
/// as stored (Pillow's bytes); others are drawn into an sRGB context (colour-managed, translucent pixels over black).
public func rgbOf(_ cg: CGImage) throws -> RgbImage {
    let w = cg.width, h = cg.height
    var rgb = [UInt8](repeating: 0, count: w * h * 3)
    let alpha = cg.alphaInfo
    let order = cg.bitmapInfo.rawValue & CGBitmapInfo.byteOrderMask.rawValue
    let model = cg.colorSpace?.model
    let plain: Set<CGImageAlphaInfo> = [.none, .last, .first, .noneSkipLast, .noneSkipFirst]
    if cg.bitsPerComponent == 8, plain.contains(alpha), order == 0 || order == CGBitmapInfo.byteOrder32Big.rawValue,
       let cf = cg.dataProvider?.data, let base = CFDataGetBytePtr(cf),
       (model == .rgb && (cg.bitsPerPixel == 24 || cg.bitsPerPixel == 32)) || (model == .monochrome && (cg.bitsPerPixel == 8 || cg.bitsPerPixel == 16)) {
        let bpp = cg.bitsPerPixel / 8
        let skip = (alpha == .first || alpha == .noneSkipFirst) && bpp > (model == .rgb ? 3 : 1) ? 1 : 0
        for y in 0..<h {
            for x in 0..<w {
                let p = base + y * cg.bytesPerRow + x * bpp + skip
                for c in 0..<3 { rgb[(y * w + x) * 3 + c] = model == .rgb ? p[c] : p[0] }
            }
        }
        return RgbImage(width: w, height: h, rgb: rgb)
    }
    var rgbx = [UInt8](repeating: 0, count: w * h * 4)
    let ok: Bool = rgbx.withUnsafeMutableBytes { buf in
        guard let ctx = CGContext(data: buf.baseAddress, width: w, height: h, bitsPerComponent: 8, bytesPerRow: w * 4,
                                  space: CGColorSpace(name: CGColorSpace.sRGB)!,
                                  bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue)) else { return false }
        ctx.draw(cg, in: CGRect(x: 0, y: 0, width: w, height: h))
        return true
    }
    if !ok { throw ImageError("the image (\(w)x\(h)) cannot be converted to RGB", "save it as an 8-bit RGB PNG or JPEG") }
    for i in 0..<(w * h) { for c in 0..<3 { rgb[i * 3 + c] = rgbx[i * 4 + c] } }
    return RgbImage(width: w, height: h, rgb: rgb)
}

// -- the pipeline ---------------------------------------------------------------------------------------------------
/// vlm.VLMPipeline: a loaded VLM bundle (checksums verified by VLMBundle.open). An actor: one generation at a time.
public actor VLMPipeline {
    public let bundle: VLMBundle
    public let imageSpec: ImageSpec
    public let contextLength: Int
    public let stopIds: [Int]
    public let hiddenSize: Int
    public let tokenizer: TextTokenizer
    public let embed: RawEmbedding
    public let decoder: CoreMLDecoder
    public let placement: String
    let vision: CoreMLGraph?
    let visionTower: CoreMLGraph?
    let visionProjector: CoreMLGraph?
    public private(set) var lastStats: GenerationStats?
    public var backend: String { decoder.name }

    init(bundle: VLMBundle, vision: CoreMLGraph?, tower: CoreMLGraph?, projector: CoreMLGraph?, decoder: CoreMLGraph, placement: String) throws {
        let g = bundle.generation, w = "generation"
        self.bundle = bundle
        imageSpec = try ImageSpec.fromDict(try jobj(g, "image", w))
        contextLength = try jint(g, "context_length", w)
        stopIds = try jints(g, "stop_ids", w)
        hiddenSize = try jint(g, "hidden_size", w)
        let prompt = try jobj(g, "prompt", w)
        let hidden = try jint(g, "hidden_size", w)
        let tokFile = try bundle.file((g["tokenizer"] as? String) ?? "tokenizer.json", "the tokenizer")
        tokenizer = try TextTokenizer(tokFile, bosId: (prompt["bos_id"] as? NSNumber)?.intValue)
        let table = try RawEmbedding(bundle)
        if table.hidden != hidden { throw BundleError("embed_tokens rows hold \(table.hidden) values, hidden_size is \(hidden)", REEXPORT) }
        embed = table
        let (rec, _) = try bundle.part("decoder_coreml")
        let details = try jobj(rec, "details", "part decoder_coreml")
        self.decoder = try CoreMLDecoder(decoder, table, details: details)
        self.vision = vision; visionTower = tower; visionProjector = projector; self.placement = placement
    }

    /// runtime.load for an ios bundle: open (checksums verified), compile the parts on first load, read the tokenizer.
    public static func load(_ dir: URL, computeUnits: MLComputeUnits = .all) async throws -> VLMPipeline {
        let b = try VLMBundle.open(dir)
        let g = b.generation
        if jhas(g, "prefusion") {
            throw BundleError("\(dir.path) needs LLaVA-Mini's prefusion part, which this package does not run",
                              "use the Python runtime (edgevlm.runtime) for this family")
        }
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        var vision: CoreMLGraph? = nil, tower: CoreMLGraph? = nil, projector: CoreMLGraph? = nil
        if ((g["vision"] as? JSON)?["kind"] as? String) == "moondream_crops" {
            tower = try await loadPart(b, "vision_tower", config)
            projector = try await loadPart(b, "vision_projector", config)
        } else {
            vision = try await loadPart(b, "vision_encoder", config)
        }
        let decoder = try await loadPart(b, "decoder_coreml", config)
        return try VLMPipeline(bundle: b, vision: vision, tower: tower, projector: projector, decoder: decoder,
                               placement: "Core ML compute units: \(computeUnits.rawValue) (0 cpu, 1 cpu+gpu, 2 all, 3 cpu+neural engine)")
    }

    // -- image and prompt -------------------------------------------------------------------------------------------
    /// VLMPipeline.pixel_values: (V, 3, S, S) floats and, for Moondream's crops, the grid.
    public func pixelValues(_ image: RgbImage) throws -> (values: [Float], views: Int, grid: (Int, Int)?) {
        if imageSpec.mode == "overlap_crops" {
            try checkSize(image.width, image.height, "the image")
            let (views, grid) = try overlapCropsWithGrid(image, imageSpec)
            return (views, 1 + grid.0 * grid.1, grid)
        }
        return (try preprocessImage(image, imageSpec), 1, nil)
    }

    /// VLMPipeline.encode_image: (T, D) image embeddings flattened, and T.
    public func encodeImage(_ image: RgbImage) throws -> (embeds: [Float], tokens: Int) {
        let (pixels, v, grid) = try pixelValues(image)
        let s = imageSpec.size
        if let vision {
            let out = try vision.run(["pixel_values": try multiArray(pixels, [1, 3, s, s])], output: PART_OUTPUTS["vision_encoder"]!)
            return (out.values, out.shape[out.shape.count - 2])
        }
        guard let visionTower, let visionProjector, let grid, let vk = bundle.generation["vision"] as? JSON else {
            throw BundleError("\(bundle.root.path) has no vision part", REEXPORT)
        }
        let feats = try visionTower.run(["pixel_values": try multiArray(pixels, [v, 3, s, s])], output: PART_OUTPUTS["vision_tower"]!)
        let n = feats.shape[feats.shape.count - 2], c = feats.shape[feats.shape.count - 1]
        let merged = try mergeCrops(feats.values, views: v, n: n, c: c, grid: grid, side: try jint(vk, "side", "generation.vision"),
                                    margin: try jint(vk, "margin", "generation.vision"))
        let out = try visionProjector.run(["merged_features": try multiArray(merged, [n, 2 * c])], output: PART_OUTPUTS["vision_projector"]!)
        return (out.values, out.shape[out.shape.count - 2])
    }

    /// VLMPipeline.embed_ids
    public func embedIds(_ ids: [Int]) throws -> [Float] { try embed.rows(ids) }

    /// VLMPipeline.prompt_pieces (template prompts as processor.tokenize_prompt; Moondream's prefix/suffix ids).
    public func promptPieces(_ prompt: String, withImage: Bool) throws -> PromptPieces {
        let p = try jobj(bundle.generation, "prompt", "generation")
        if (p["kind"] as? String) == "moondream" {
            if try checkPrompt(prompt).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
                throw ConfigError("the question is empty", "pass a non-empty question, e.g. 'What is in this image?'")
            }
            let text = try tokenizer.encode((jbool(p, "space_before_text", false) ? " " : "") + prompt)
            let ids = try jints(p, "prefix", "generation.prompt") + text + jints(p, "suffix", "generation.prompt")
            let bos = [try jint(p, "bos_id", "generation.prompt")]
            return withImage ? PromptPieces(before: bos, after: ids, hasImage: true) : PromptPieces(before: bos + ids, after: [], hasImage: false)
        }
        if try checkPrompt(prompt).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            throw ConfigError("the prompt is empty", "pass a question or an instruction, e.g. 'Describe this image.'")
        }
        let template = try jstr(p, "template", "generation.prompt")
        let text = template.replacingOccurrences(of: "{prompt}", with: prompt)
        var head = text, tail = ""
        if withImage, let r = text.range(of: IMAGE_MARKER) {
            head = String(text[..<r.lowerBound]); tail = String(text[r.upperBound...])
        } else {
            head = text.replacingOccurrences(of: IMAGE_MARKER, with: "")
        }
        let bos = jbool(p, "bos", false) ? (tokenizer.bosId.map { [$0] } ?? []) : []
        let before = try bos + tokenizer.encode(head)
        var after: [Int] = []
        if !tail.isEmpty { after = try tokenizer.encode(tail) }
        return PromptPieces(before: before, after: after, hasImage: template.contains(IMAGE_MARKER) && withImage)
    }

    /// VLMPipeline.prepare: [before | image | after] embeddings, image tokens, bidirectional prefix length
    /// (SmolVLM's idefics3_tiles: prepareTiles).
    public func prepare(_ image: RgbImage?, _ prompt: String) throws -> Prepared {
        if imageSpec.mode == "idefics3_tiles" { return try prepareTiles(image, prompt) }
        let pieces = try promptPieces(prompt, withImage: image != nil)
        let img = try image.map { try encodeImage($0) }
        let before = try embedIds(pieces.before), after = try embedIds(pieces.after)
        let d = hiddenSize
        guard let img else { return Prepared(embeds: before + after, length: (before.count + after.count) / d, pieces: pieces, imageTokens: 0, prefix: 0) }
        let prefix = jbool(bundle.generation, "bidirectional_image_prefix", false) ? pieces.before.count + img.tokens : 0
        let all = before + img.embeds + after
        return Prepared(embeds: all, length: all.count / d, pieces: pieces, imageTokens: img.tokens, prefix: prefix)
    }

    /// The vision encoder once per view of idefics3TilesWithGrid: (1, 3, S, S) -> (1, T, D), flattened. (Python feeds
    /// all V views in one call and cuts the (1, V*T, D) result into V slots of T; the graph encodes each view on its
    /// own, so one view at a time gives the same slots with one view's activations in memory.)
    public func encodeTiles(_ tiles: TilesWithGrid) throws -> [[Float]] {
        guard let vision else { throw BundleError("\(bundle.root.path) has no vision_encoder part", REEXPORT) }
        let s = imageSpec.size, per = 3 * s * s
        return try (0..<tiles.count).map { v in
            let px = Array(tiles.views[(v * per)..<((v + 1) * per)])
            return try vision.run(["pixel_values": try multiArray(px, [1, 3, s, s])], output: PART_OUTPUTS["vision_encoder"]!).values
        }
    }

    /// VLMPipeline._prepare_tiles (SmolVLM / Idefics3, image.mode idefics3_tiles): each view's embeddings (tiles
    /// row-major, then the global view) in its own slot between the processor's text runs (Crops.swift:
    /// idefics3TextRuns with the row/col and global-image markers, each run tokenized on its own, BOS first).
    public func prepareTiles(_ image: RgbImage?, _ prompt: String) throws -> Prepared {
        if try checkPrompt(prompt).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            throw ConfigError("the prompt is empty", "pass a question or an instruction, e.g. 'Describe this image.'")
        }
        let p = try jobj(bundle.generation, "prompt", "generation")
        let tiles = try image.map { try idefics3TilesWithGrid($0, imageSpec) }
        let views = try tiles.map { try encodeTiles($0) } ?? []
        let bos = jbool(p, "bos", false) ? tokenizer.bosId : nil
        let texts = idefics3TextRuns(try jstr(p, "template", "generation.prompt"), prompt, tiles?.grid)
        let runs = try idefics3RunIds(texts, bosId: bos) { try tokenizer.encode($0) }
        let all = try spliceViews(try runs.map { try embedIds($0) }, views)
        let pieces = PromptPieces(before: runs[0], after: Array(runs.dropFirst().joined()), hasImage: tiles != nil)
        return Prepared(embeds: all, length: all.count / hiddenSize, pieces: pieces,
                        imageTokens: views.reduce(0) { $0 + $1.count } / hiddenSize, prefix: 0)
    }

    // -- generation -------------------------------------------------------------------------------------------------
    /// VLMPipeline.decode_tokens: a fresh state, prefill, then one step per token; ``emit`` as decodeLoop's.
    public func decodeTokens(_ prep: Prepared, _ cfg: GenerationConfig, _ stats: inout GenerationStats,
                             emit: (Int) throws -> Bool) throws {
        var rng = SplitMix64(seed: cfg.seed ?? UInt64.random(in: 0...UInt64.max))
        decoder.reset()
        try decodeLoop(prefill: { try decoder.prefill(prep.embeds, prep.length, prep.prefix) }, step: { try decoder.step($0) },
                       pick: { pickToken($0, cfg, &rng) }, cfg: cfg, stats: &stats, nPrompt: prep.length,
                       maxContext: contextLength, emit: emit)
    }

    /// VLMPipeline.generate(..., stream=True): text pieces as the answer grows (an AsyncThrowingStream, so that a
    /// refused prompt or a Core ML failure reaches the caller). The bundle's stop ids are used; ``lastStats`` holds
    /// time to first token and tokens/s once the stream ends. Cancelling the consuming task stops the decoder.
    public nonisolated func generate(_ image: RgbImage?, _ prompt: String, maxNewTokens: Int = 64, temperature: Double = 0,
                                     topP: Double = 1, topK: Int = 0, seed: UInt64? = nil) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    try await self.stream(image, prompt, maxNewTokens, temperature, topP, topK, seed) { continuation.yield($0) }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    func stream(_ image: RgbImage?, _ prompt: String, _ maxNewTokens: Int, _ temperature: Double, _ topP: Double, _ topK: Int,
                _ seed: UInt64?, _ send: (String) -> Void) throws {
        let cfg = try GenerationConfig(maxNewTokens: maxNewTokens, temperature: temperature, topP: topP, topK: topK, seed: seed,
                                       stopIds: stopIds)
        let t0 = now()
        let prep = try prepare(image, prompt)
        var stats = GenerationStats()
        stats.promptTokens = prep.pieces.nText
        stats.imageTokens = prep.imageTokens
        stats.encodeS = now() - t0
        defer {
            stats.timeToFirstTokenS += stats.encodeS
            lastStats = stats
            decoder.reset()                  // an interrupted stream leaves no half-filled cache behind
        }
        let dec = StreamDecoder { [tokenizer] in tokenizer.decode($0) }
        try decodeTokens(prep, cfg, &stats) { tok in
            let delta = dec.push(tok)
            if !delta.isEmpty { send(delta) }
            return !Task.isCancelled
        }
        let tail = dec.flush()
        if !tail.isEmpty { send(tail) }
    }

    // -- golden cases -----------------------------------------------------------------------------------------------
    /// golden.vlm_trace: greedy ids (no early stop, as many as refIds) and the logits teacher-forced on refIds.
    public func vlmTrace(_ image: RgbImage, _ prompt: String, _ refIds: [Int]) throws -> Trace {
        let prep = try prepare(image, prompt)
        var ids: [Int] = []
        var stats = GenerationStats()
        try decodeTokens(prep, try GenerationConfig(maxNewTokens: refIds.count), &stats) { ids.append($0); return true }
        decoder.reset()
        var logits = [try decoder.prefill(prep.embeds, prep.length, prep.prefix)]
        for t in refIds.dropLast() { logits.append(try decoder.step(t)) }
        decoder.reset()
        return Trace(ids: ids, logits: logits, promptLen: prep.length)
    }

    /// VLMPipeline.verify: run the bundle's golden cases and judge them by the stored criteria (Golden.swift).
    public func verify() throws -> Report {
        guard let cases = try goldenCases(bundle) else { return noGolden(bundle: bundle.root.path, backend: backend, madeBy: bundle.madeBy) }
        return try EdgeVLM.verify(bundle: bundle.root.lastPathComponent, backend: backend, placement: placement, cases: cases) { c in
            let f = try bundle.file("\(GOLDEN_DIR)/\(c.image)", "golden case \(c.id)")
            return try vlmTrace(try loadImage(try Data(contentsOf: f), what: f.path), c.prompt, c.tokens)
        }
    }
}

/// SHA-256 of strings (the compiled-model cache key).
struct SHA256Hasher {
    var h = CryptoKit.SHA256()
    mutating func update(_ s: String) { h.update(data: Data(s.utf8)) }
    var hex: String { h.finalize().map { String(format: "%02x", $0) }.joined() }
}

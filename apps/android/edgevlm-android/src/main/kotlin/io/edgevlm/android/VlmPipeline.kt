// edgevlm/runtime/vlm.py's VLMPipeline and OrtDecoder on ONNX Runtime's Java API (onnxruntime-android), with the
// tokenizer and detokenizer as ONNX graphs run through onnxruntime-extensions' custom op library. Same names as the
// Python runtime in camelCase (README: the mapping table). Not built or run in CI: see the README.
package io.edgevlm.android

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtException
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import ai.onnxruntime.extensions.OrtxPackage
import android.graphics.Bitmap
import android.graphics.BitmapFactory
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock
import java.io.File
import java.nio.FloatBuffer
import java.nio.IntBuffer
import java.nio.LongBuffer
import java.util.SplittableRandom

const val IMAGE_MARKER = "<image>"
const val MAX_FILE_BYTES = 50 * 1024 * 1024

/** vlm._Graph: one part in an OrtSession; refuses a graph without the inputs the runtime feeds. */
class Graph(val file: File, val session: OrtSession, expect: List<String> = emptyList()) : AutoCloseable {
    val inputs: Set<String> = session.inputNames
    val outputs: List<String> = session.outputNames.toList()

    init {
        val missing = expect.filter { it !in inputs }
        if (missing.isNotEmpty()) throw BundleError("${file.name} is not the graph this part needs: it lacks the " +
            "input(s) ${missing.take(4).joinToString()} (it takes ${inputs.sorted().take(4).joinToString()})",
            "re-export the bundle with `edgevlm export`")
    }

    fun run(feeds: Map<String, OnnxTensor>): OrtSession.Result = try {
        session.run(feeds)
    } catch (e: OrtException) {
        throw BundleError("ONNX Runtime failed running ${file.name}: ${e.message?.lineSequence()?.firstOrNull()}",
            "re-export the bundle with `edgevlm export`; if it persists, report it")
    }

    override fun close() = session.close()
}

private fun OrtSession.Result.tensor(name: String, graph: File): OnnxTensor {
    val v = get(name)
    if (!v.isPresent) throw BundleError("${graph.name} has no $name output", "re-export the bundle")
    return v.get() as OnnxTensor
}

private fun OnnxTensor.floats(): FloatArray {
    val b = floatBuffer
    return FloatArray(b.remaining()).also { b.get(it) }
}

/** processor.PromptPieces */
class PromptPieces(val before: List<Int>, val after: List<Int>, val hasImage: Boolean) {
    val nText: Int get() = before.size + after.size
}

/** VLMPipeline.prepare's result: inputs_embeds (1, length, hiddenSize) flattened, image tokens, bidirectional prefix. */
class Prepared(val embeds: FloatArray, val length: Int, val pieces: PromptPieces, val imageTokens: Int, val prefix: Int)

/** processor.TextTokenizer on the bundle's tokenizer graphs (manifest.processing): encode = tokenizer.onnx, decode =
 *  detokenizer.onnx, both with onnxruntime-extensions' ops. */
class TextTokenizer(private val env: OrtEnvironment, private val tok: Graph, private val tokIn: String,
                    private val tokOut: String, private val detok: Graph, private val detokIn: String,
                    private val detokOut: String) : AutoCloseable {
    private val detokRank = (detok.session.inputInfo[detokIn]?.info as? TensorInfo)?.shape?.size ?: 0

    fun encode(text: String): List<Int> {
        checkPrompt(text)
        if (text.isEmpty()) return emptyList()                  // tokenizers encodes "" as no ids
        OnnxTensor.createTensor(env, arrayOf(text)).use { t ->
            tok.run(mapOf(tokIn to t)).use { r ->
                val ids = r.tensor(tokOut, tok.file).longBuffer
                    ?: throw BundleError("${tok.file.name}'s $tokOut is not int64", "re-export the bundle")
                return List(ids.remaining()) { ids.get(it).toInt() }
            }
        }
    }

    fun decode(ids: List<Int>): String {
        if (ids.isEmpty()) return ""
        val data = LongBuffer.wrap(LongArray(ids.size) { ids[it].toLong() })
        // (1, N) as the tokenizer graph returns them, unless the graph declares rank 1 (its input may have no shape)
        val shape = if (detokRank == 1) longArrayOf(ids.size.toLong()) else longArrayOf(1, ids.size.toLong())
        OnnxTensor.createTensor(env, data, shape).use { t ->
            detok.run(mapOf(detokIn to t)).use { r ->
                return when (val v = r.tensor(detokOut, detok.file).value) {
                    is String -> v
                    is Array<*> -> v.firstOrNull() as? String ?: ""
                    else -> throw BundleError("${detok.file.name}'s $detokOut is not a string tensor", "re-export the bundle")
                }
            }
        }
    }

    override fun close() { tok.close(); detok.close() }
}

/** vlm.OrtDecoder on OrtSession.run: inputs_embeds + additive mask + positions + past KV -> logits + present KV.
 *  The present tensors of one call are the past of the next (their Result stays open until then). A decoder with
 *  ``seqlens_k`` (the cpu/android attention fusion) gets KV buffers of ``capacity`` positions from the start
 *  (Python grows them from 256 and binds them in place with IO binding; the figures are the same, see README). */
class OrtDecoder(private val env: OrtEnvironment, val graph: Graph, val embed: Graph, val layers: Int,
                 val kvHeads: Int, val headDim: Int, val capacity: Int) : AutoCloseable {
    val name = "onnxruntime"
    val sharedKv = "seqlens_k" in graph.inputs
    private val kvNames = (0 until layers).flatMap { listOf("$it.key", "$it.value") }
    var nPast = 0
        private set
    private var past: Map<String, OnnxTensor> = emptyMap()
    private var held: OrtSession.Result? = null
    private val owned = ArrayList<OnnxTensor>()

    init {
        val need = DECODER_INPUTS + kvNames.map { "past_key_values.$it" }
        val missing = need.filter { it !in graph.inputs }
        if (missing.isNotEmpty()) throw BundleError("${graph.file.name} is not a decoder with $layers layers: it " +
            "lacks the input(s) ${missing.take(4).joinToString()}", "re-export the bundle with `edgevlm export`")
        if ("logits" !in graph.outputs) throw BundleError("${graph.file.name} has no logits output", "re-export the bundle")
        reset()
    }

    private fun dropPast() {
        held?.close()
        held = null
        owned.forEach { it.close() }
        owned.clear()
    }

    fun reset() {
        dropPast()
        nPast = 0
        val len = if (sharedKv) capacity else 0
        past = kvNames.associate { n ->
            val t = OnnxTensor.createTensor(env, FloatBuffer.allocate(kvHeads * len * headDim),
                longArrayOf(1, kvHeads.toLong(), len.toLong(), headDim.toLong()))
            owned.add(t)
            "past_key_values.$n" to t
        }
    }

    private fun run(embeds: FloatArray, s: Int, prefix: Int): FloatArray {
        val d = embeds.size / s
        val total = nPast + s
        if (sharedKv && total > capacity) throw ConfigError("the sequence reached $total positions, the KV buffers " +
            "hold $capacity (the bundle's context_length)", "shorten the prompt or ask for fewer tokens")
        val mine = ArrayList<OnnxTensor>()
        val feeds = HashMap<String, OnnxTensor>(past)
        fun add(name: String, t: OnnxTensor) { feeds[name] = t; mine.add(t) }
        try {
            add("inputs_embeds", OnnxTensor.createTensor(env, FloatBuffer.wrap(embeds), longArrayOf(1, s.toLong(), d.toLong())))
            add("attention_mask", OnnxTensor.createTensor(env, FloatBuffer.wrap(attentionMask(s, nPast, if (nPast == 0) prefix else 0)),
                longArrayOf(1, 1, s.toLong(), total.toLong())))
            add("position_ids", OnnxTensor.createTensor(env, LongBuffer.wrap(LongArray(s) { (nPast + it).toLong() }),
                longArrayOf(1, s.toLong())))
            if (sharedKv) {
                add("seqlens_k", OnnxTensor.createTensor(env, IntBuffer.wrap(intArrayOf(total - 1)), longArrayOf(1)))
                add("total_sequence_length", OnnxTensor.createTensor(env, total))     // an int32 scalar
            }
            val result = graph.run(feeds)
            val logits: FloatArray
            val next: Map<String, OnnxTensor>
            try {
                logits = result.tensor("logits", graph.file).floats()
                next = kvNames.associate { "past_key_values.$it" to result.tensor("present.$it", graph.file) }
            } catch (e: Exception) {
                result.close()
                throw e
            }
            dropPast()                   // the previous Result (this call's past) is no longer needed
            held = result
            past = next
            nPast = total
            return logits
        } finally {
            mine.forEach { it.close() }
        }
    }

    /** (S, D) embeddings -> (V,) logits of the last position. */
    fun prefill(embeds: FloatArray, s: Int, prefix: Int = 0): FloatArray = run(embeds, s, prefix)

    fun step(token: Int): FloatArray {
        val emb = OnnxTensor.createTensor(env, LongBuffer.wrap(longArrayOf(token.toLong())), longArrayOf(1, 1)).use { t ->
            embed.run(mapOf("input_ids" to t)).use { r -> (r.get(0) as OnnxTensor).floats() }
        }
        return run(emb, 1, 0)
    }

    override fun close() { dropPast(); past = emptyMap() }
}

/** data.images.load_image: decode image bytes to 8-bit RGB as Pillow's convert("RGB") does (no EXIF rotation, alpha
 *  dropped without premultiplying, the same size limits). The Bitmap is decoded unpremultiplied, which Android
 *  cannot draw: show the user a separately decoded Bitmap. */
fun loadImage(bytes: ByteArray, what: String = "image"): RgbImage {
    if (bytes.size > MAX_FILE_BYTES) throw ImageError("$what is over ${MAX_FILE_BYTES shr 20} MiB", "use a smaller image file")
    val bounds = BitmapFactory.Options().apply { inJustDecodeBounds = true }
    BitmapFactory.decodeByteArray(bytes, 0, bytes.size, bounds)
    if (bounds.outWidth <= 0) throw ImageError("$what is not a decodable image",
        "pass a complete PNG, JPEG, BMP or WebP file (re-save or re-download it)")
    checkSize(bounds.outWidth, bounds.outHeight, what)
    val opts = BitmapFactory.Options().apply {
        inPremultiplied = false                   // getPixels then returns the stored colour bytes
        inScaled = false
        inPreferredConfig = Bitmap.Config.ARGB_8888
    }
    val bitmap = BitmapFactory.decodeByteArray(bytes, 0, bytes.size, opts)
        ?: throw ImageError("$what is not a decodable image", "pass a complete PNG, JPEG, BMP or WebP file")
    try {
        return rgbOf(bitmap)
    } finally {
        bitmap.recycle()
    }
}

/** A Bitmap's pixels as 8-bit RGB (Image.convert("RGB"): alpha dropped). getPixels returns unpremultiplied colours;
 *  a premultiplied Bitmap with translucent pixels has lost precision already: prefer loadImage on the file's bytes. */
fun rgbOf(bitmap: Bitmap): RgbImage {
    val w = bitmap.width
    val h = bitmap.height
    val argb = IntArray(w * h)
    bitmap.getPixels(argb, 0, w, 0, 0, w, h)
    val rgb = IntArray(w * h * 3)
    for (i in 0 until w * h) {
        rgb[i * 3] = (argb[i] shr 16) and 0xff
        rgb[i * 3 + 1] = (argb[i] shr 8) and 0xff
        rgb[i * 3 + 2] = argb[i] and 0xff
    }
    return RgbImage(w, h, rgb)
}

/** vlm.VLMPipeline: a loaded VLM bundle (checksums verified by Bundle.open). One generation at a time. */
class VlmPipeline(val bundle: Bundle, providers: List<String>? = null,
                  val threads: Int = Runtime.getRuntime().availableProcessors()) : AutoCloseable {
    val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    val stopIds = bundle.stopIds
    val contextLength = bundle.contextLength
    val hiddenSize = bundle.generation.getInt("hidden_size")
    /** The providers the sessions were given, in order; names edgevlm-android cannot add are listed as skipped. */
    val placement: String
    private val options: OrtSession.SessionOptions
    private val textOptions: OrtSession.SessionOptions
    val vision: Graph
    val embed: Graph
    val decoder: OrtDecoder
    val tokenizer: TextTokenizer
    private val lock = Mutex()
    var lastStats: GenerationStats? = null
        private set
    val backend: String get() = decoder.name

    init {
        val (opts, used) = sessionOptions(providers ?: bundle.providers)
        options = opts
        placement = used
        textOptions = OrtSession.SessionOptions().apply {
            registerCustomOpLibrary(OrtxPackage.getLibraryPath())      // onnxruntime-extensions' tokenizer ops
        }
        vision = graph("vision_encoder")
        embed = graph("embed_tokens")
        decoder = OrtDecoder(env, Graph(bundle.part("decoder"), env.createSession(bundle.part("decoder").path, options)),
            embed, bundle.numLayers, bundle.numKvHeads, bundle.headDim, contextLength)
        val t = bundle.processing("tokenizer")
        val d = bundle.processing("detokenizer")
        tokenizer = TextTokenizer(env,
            Graph(bundle.file(t.getString("path"), "the tokenizer graph"),
                env.createSession(bundle.file(t.getString("path"), "the tokenizer graph").path, textOptions), listOf(t.getString("input"))),
            t.getString("input"), t.getString("output"),
            Graph(bundle.file(d.getString("path"), "the detokenizer graph"),
                env.createSession(bundle.file(d.getString("path"), "the detokenizer graph").path, textOptions), listOf(d.getString("input"))),
            d.getString("input"), d.getString("output"))
    }

    private fun graph(name: String): Graph {
        val f = bundle.part(name)
        return Graph(f, env.createSession(f.path, options), PART_INPUTS[name] ?: emptyList())
    }

    /** SessionOptions for the model parts, the profile's providers in order (the CPU provider is ONNX Runtime's
     *  fallback and always there). */
    private fun sessionOptions(providers: List<String>): Pair<OrtSession.SessionOptions, String> {
        val o = OrtSession.SessionOptions()
        val used = ArrayList<String>()
        val skipped = ArrayList<String>()
        var xnnpack = false
        for (p in providers) when (p) {
            "NnapiExecutionProvider", "NNAPI" -> { o.addNnapi(); used.add(p) }
            "XnnpackExecutionProvider", "XNNPACK" -> {
                o.addXnnpack(mapOf("intra_op_num_threads" to threads.toString()))
                xnnpack = true
                used.add(p)
            }
            "CPUExecutionProvider", "CPU" -> used.add(p)
            else -> skipped.add(p)                          // QNN needs the onnxruntime-android-qnn package
        }
        if (xnnpack) {                                      // ONNX Runtime's XNNPACK page: avoid two spinning pools
            o.addConfigEntry("session.intra_op.allow_spinning", "0")
            o.setIntraOpNumThreads(1)
        } else {
            o.setIntraOpNumThreads(threads)
        }
        if ("CPUExecutionProvider" !in used && "CPU" !in used) used.add("CPUExecutionProvider (fallback)")
        return o to ("providers: " + used.joinToString() + if (skipped.isEmpty()) "" else "; skipped: " + skipped.joinToString())
    }

    // -- image and prompt -----------------------------------------------------------------------------------------
    fun pixelValues(image: RgbImage): FloatArray = preprocessImage(image, bundle.imageSpec)

    /** (T, D) image embeddings flattened, and T. */
    fun encodeImage(image: RgbImage): Pair<FloatArray, Int> {
        val size = bundle.imageSpec.size.toLong()
        OnnxTensor.createTensor(env, FloatBuffer.wrap(pixelValues(image)), longArrayOf(1, 3, size, size)).use { t ->
            vision.run(mapOf("pixel_values" to t)).use { r ->
                val out = r.get(0) as OnnxTensor
                val shape = out.info.shape
                return out.floats() to shape[shape.size - 2].toInt()
            }
        }
    }

    fun embedIds(ids: List<Int>): FloatArray {
        if (ids.isEmpty()) return FloatArray(0)
        OnnxTensor.createTensor(env, LongBuffer.wrap(LongArray(ids.size) { ids[it].toLong() }),
            longArrayOf(1, ids.size.toLong())).use { t ->
            embed.run(mapOf("input_ids" to t)).use { r -> return (r.get(0) as OnnxTensor).floats() }
        }
    }

    /** VLMPipeline.prompt_pieces / processor.tokenize_prompt for template prompts. */
    fun promptPieces(prompt: String, withImage: Boolean): PromptPieces {
        if (checkPrompt(prompt).isBlank()) throw ConfigError("the prompt is empty",
            "pass a question or an instruction, e.g. 'Describe this image.'")
        val p = bundle.generation.getJSONObject("prompt")
        val template = p.getString("template")
        val text = template.replace("{prompt}", prompt)
        val head: String
        val tail: String
        if (IMAGE_MARKER in text && withImage) {
            head = text.substringBefore(IMAGE_MARKER)
            tail = text.substringAfter(IMAGE_MARKER)
        } else {
            head = text.replace(IMAGE_MARKER, "")
            tail = ""
        }
        val bos = if (p.optBoolean("bos", false) && p.has("bos_id") && !p.isNull("bos_id")) listOf(p.getInt("bos_id")) else emptyList()
        return PromptPieces(bos + tokenizer.encode(head), if (tail.isNotEmpty()) tokenizer.encode(tail) else emptyList(),
            IMAGE_MARKER in template && withImage)
    }

    /** VLMPipeline.prepare: [before | image | after] embeddings, image tokens, bidirectional prefix length
     *  (SmolVLM's idefics3_tiles: prepareTiles). */
    fun prepare(image: RgbImage?, prompt: String): Prepared {
        if (bundle.imageSpec.mode == "idefics3_tiles") return prepareTiles(image, prompt)
        val pieces = promptPieces(prompt, image != null)
        val img = image?.let { encodeImage(it) }
        val before = embedIds(pieces.before)
        val after = embedIds(pieces.after)
        val d = hiddenSize
        if (img == null) return Prepared(before + after, (before.size + after.size) / d, pieces, 0, 0)
        val nBefore = before.size / d
        val prefix = if (bundle.bidirectionalImagePrefix) nBefore + img.second else 0
        val all = before + img.first + after
        return Prepared(all, all.size / d, pieces, img.second, prefix)
    }

    /** The vision encoder once per view of idefics3TilesWithGrid: (1, 3, S, S) -> (1, T, D), flattened. (Python feeds
     *  all V views in one call, (V, 3, S, S) -> (1, V*T, D), and cuts the result into V slots of T; the graph encodes
     *  each view on its own, so one view at a time gives the same slots with one view's activations in memory.) */
    fun encodeTiles(tiles: TilesWithGrid): List<FloatArray> {
        val s = bundle.imageSpec.size
        val per = 3 * s * s
        return (0 until tiles.count).map { v ->
            val px = tiles.views.copyOfRange(v * per, (v + 1) * per)
            OnnxTensor.createTensor(env, FloatBuffer.wrap(px), longArrayOf(1, 3, s.toLong(), s.toLong())).use { t ->
                vision.run(mapOf("pixel_values" to t)).use { r -> (r.get(0) as OnnxTensor).floats() }
            }
        }
    }

    /** VLMPipeline._prepare_tiles (SmolVLM / Idefics3, image.mode idefics3_tiles): each view's embeddings (tiles
     *  row-major, then the global view) in its own slot between the processor's text runs (Crops.kt:
     *  idefics3TextRuns with the row/col and global-image markers, each run tokenized on its own, BOS first). */
    fun prepareTiles(image: RgbImage?, prompt: String): Prepared {
        if (checkPrompt(prompt).isBlank()) throw ConfigError("the prompt is empty",
            "pass a question or an instruction, e.g. 'Describe this image.'")
        val p = bundle.generation.getJSONObject("prompt")
        val tiles = image?.let { idefics3TilesWithGrid(it, bundle.imageSpec) }
        val views = if (tiles == null) emptyList() else encodeTiles(tiles)
        val bos = if (p.optBoolean("bos", false) && p.has("bos_id") && !p.isNull("bos_id")) p.getInt("bos_id") else null
        val runs = idefics3RunIds(idefics3TextRuns(p.getString("template"), prompt, tiles?.grid), bos) { tokenizer.encode(it) }
        val all = spliceViews(runs.map { embedIds(it) }, views)
        val pieces = PromptPieces(runs[0], runs.drop(1).flatten(), tiles != null)
        return Prepared(all, all.size / hiddenSize, pieces, views.sumBy { it.size } / hiddenSize, 0)
    }

    // -- generation -------------------------------------------------------------------------------------------------
    /** VLMPipeline.decode_tokens */
    fun decodeTokens(prep: Prepared, cfg: GenerationConfig, stats: GenerationStats): Sequence<Int> {
        val rng = SplittableRandom(cfg.seed ?: System.nanoTime())
        decoder.reset()
        return decodeLoop({ decoder.prefill(prep.embeds, prep.length, prep.prefix) }, { decoder.step(it) },
            { pickToken(it, cfg, rng) }, cfg, stats, prep.length, contextLength)
    }

    /** VLMPipeline.generate(..., stream=True): text pieces as the answer grows. The bundle's stop ids replace
     *  cfg's (as VLMPipeline.start does); lastStats holds time to first token and tokens/s once the flow ends. */
    fun generate(image: RgbImage?, prompt: String, cfg: GenerationConfig = GenerationConfig()): Flow<String> = flow<String> {
        lock.withLock {
            val c = GenerationConfig(cfg.maxNewTokens, cfg.temperature, cfg.topP, cfg.topK, cfg.seed, stopIds)
            val t0 = System.nanoTime()
            val prep = prepare(image, prompt)
            val stats = GenerationStats()
            stats.promptTokens = prep.pieces.nText
            stats.imageTokens = prep.imageTokens
            stats.encodeS = (System.nanoTime() - t0) / 1e9
            lastStats = stats
            try {
                val dec = StreamDecoder { tokenizer.decode(it) }
                for (tok in decodeTokens(prep, c, stats)) {
                    val delta = dec.push(tok)
                    if (delta.isNotEmpty()) emit(delta)
                }
                val tail = dec.flush()
                if (tail.isNotEmpty()) emit(tail)
            } finally {
                stats.timeToFirstTokenS += stats.encodeS
                decoder.reset()          // an interrupted stream leaves no half-filled cache behind
            }
        }
    }.flowOn(Dispatchers.Default)

    /** generate for a Bitmap (its pixels through rgbOf). */
    fun generate(bitmap: Bitmap, prompt: String, cfg: GenerationConfig = GenerationConfig()): Flow<String> =
        generate(rgbOf(bitmap), prompt, cfg)

    // -- golden cases ----------------------------------------------------------------------------------------------
    /** golden.vlm_trace: greedy ids (no early stop, as many as refIds) and the logits teacher-forced on refIds. */
    fun vlmTrace(image: RgbImage, prompt: String, refIds: IntArray): Trace {
        val prep = prepare(image, prompt)
        val ids = decodeTokens(prep, GenerationConfig(maxNewTokens = refIds.size), GenerationStats()).toList()
        decoder.reset()
        val logits = ArrayList<FloatArray>()
        logits.add(decoder.prefill(prep.embeds, prep.length, prep.prefix))
        for (t in refIds.dropLast(1)) logits.add(decoder.step(t))
        decoder.reset()
        return Trace(ids, logits.toTypedArray(), prep.length)
    }

    /** VLMPipeline.verify: run the bundle's golden cases and judge them by the stored criteria (Golden.kt). Blocking:
     *  call it off the main thread. */
    fun verify(): Report {
        val cases = bundle.goldenCases() ?: return noGolden(bundle.root.path, backend, bundle.madeBy)
        return io.edgevlm.android.verify(bundle.root.path, backend, placement, cases) { c ->
            val f = bundle.file("$GOLDEN_DIR/${c.image}", "golden case ${c.id}")
            vlmTrace(loadImage(f.readBytes(), f.path), c.prompt, c.tokens)
        }
    }

    override fun close() {
        decoder.close()
        decoder.graph.close()
        vision.close()
        embed.close()
        tokenizer.close()
        options.close()
        textOptions.close()
    }
}

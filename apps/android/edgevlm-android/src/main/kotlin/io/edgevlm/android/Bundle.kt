// A bundle directory in app storage: edgevlm/bundle.py's read_manifest, verify (every listed file's size and
// streamed SHA-256; missing, extra, linked or special files refused) and resolve (a path the manifest names must be
// relative, stay inside the bundle, pass through no link and be listed with its checksum). The manifest is read
// generically with org.json (part of the Android platform); tests/test_apps_android.py checks every key this file
// reads against a real exported manifest.
package io.edgevlm.android

import org.json.JSONArray
import org.json.JSONObject
import java.io.File
import java.io.FileInputStream
import java.nio.file.Files
import java.security.MessageDigest

const val MANIFEST = "manifest.json"
const val MAX_MANIFEST_BYTES = 16 shl 20
private const val REEXPORT = "re-export the bundle with `edgevlm export`"

/** The parts this library runs; a bundle of another layout (Moondream2's vision_tower + vision_projector, LLaVA-Mini's
 *  prefusion) is refused at open with a one-line error. */
val PART_INPUTS = mapOf("vision_encoder" to listOf("pixel_values"), "embed_tokens" to listOf("input_ids"))
val DECODER_INPUTS = listOf("inputs_embeds", "attention_mask", "position_ids")

class Bundle private constructor(val root: File, val manifest: JSONObject) {
    val generation: JSONObject = manifest.optJSONObject("generation")
        ?: throw BundleError("$root lacks the generation/parts blocks of a VLM bundle", "export it again")
    val parts: JSONObject = manifest.optJSONObject("parts")
        ?: throw BundleError("$root lacks the generation/parts blocks of a VLM bundle", "export it again")
    val target: JSONObject = manifest.optJSONObject("target") ?: JSONObject()

    init {
        if (manifest.optString("task") != "vlm") throw BundleError(
            "$root is a ${manifest.optString("task", "?")} bundle, not a VLM bundle", "pass a bundle exported for a VLM")
        val fmt = target.optString("format")
        if (fmt != "ort" && fmt != "onnx") throw BundleError(
            "$root was exported for target '${target.optString("name")}' ($fmt), which ONNX Runtime cannot run",
            "export the model again with --target android")
        val vision = generation.optJSONObject("vision")?.optString("kind", "encoder") ?: "encoder"
        if (vision != "encoder" || !parts.has("vision_encoder")) throw BundleError(
            "$root is a '$vision' VLM (parts: ${parts.keys().asSequence().joinToString()}); edgevlm-android runs the " +
                "families with one vision_encoder part", "use the Python runtime (edgevlm.runtime) for this family")
        if (generation.has("prefusion")) throw BundleError(
            "$root needs LLaVA-Mini's prefusion part, which edgevlm-android does not run",
            "use the Python runtime (edgevlm.runtime) for this family")
        if (generation.getJSONObject("prompt").optString("kind", "template") != "template") throw BundleError(
            "$root has a '${generation.getJSONObject("prompt").optString("kind")}' prompt, edgevlm-android builds " +
                "template prompts", "use the Python runtime (edgevlm.runtime) for this family")
        if (!parts.has("decoder")) throw BundleError("$root holds no ONNX decoder (parts: " +
            parts.keys().asSequence().joinToString() + ")", "re-export with --decoder onnx or both")
    }

    val imageSpec: ImageSpec by lazy {
        val d = generation.getJSONObject("image")
        val o = d.optJSONObject("options")          // layout options (idefics3_tiles: longest_edge, splitting, resample)
        val options = o?.keys()?.asSequence()?.associateWith { o.get(it) } ?: emptyMap()
        ImageSpec(d.getInt("size"), d.optString("mode", "crop"), d.optString("interpolation", "bicubic"),
            d.optJSONArray("mean")?.let { floats(it) } ?: CLIP_MEAN, d.optJSONArray("std")?.let { floats(it) } ?: CLIP_STD,
            options)
    }
    val contextLength: Int get() = generation.getInt("context_length")
    val stopIds: IntArray get() = ints(generation.getJSONArray("stop_ids"))
    val numLayers: Int get() = generation.getInt("num_layers")
    val numKvHeads: Int get() = generation.getInt("num_kv_heads")
    val headDim: Int get() = generation.getInt("head_dim")
    val bidirectionalImagePrefix: Boolean get() = generation.optBoolean("bidirectional_image_prefix", false)

    /** The ONNX Runtime providers the target profile names, in order (CPUExecutionProvider when none). */
    val providers: List<String> get() = target.optJSONArray("providers")?.let { a -> (0 until a.length()).map { a.getString(it) } }
        ?: listOf("CPUExecutionProvider")

    /** The file of ``parts[name]``, resolved. */
    fun part(name: String): File {
        val rec = parts.optJSONObject(name) ?: throw BundleError("$root has no $name part",
            "copy the whole bundle directory again, or re-export")
        return file(rec.getString("path"), "part '$name'")
    }

    fun partPrecision(name: String): String = parts.optJSONObject(name)?.optString("precision", "fp32") ?: "fp32"

    /** manifest.processing.<which> (tokenizer / detokenizer): the graph file and its input and output names. */
    fun processing(which: String): JSONObject {
        val block = manifest.optJSONObject("processing") ?: throw BundleError(
            "$root has no processing block (tokenizer graphs for onnxruntime-extensions)",
            "re-export the bundle with `edgevlm export --target android`")
        return block.optJSONObject(which) ?: throw BundleError("$root carries no $which graph" +
            (if (block.has("not_expressed")) ": ${block.optString("not_expressed")}" else ""),
            "use a model whose tokenizer the export expresses as a graph, or the Python runtime")
    }

    /** bundle.resolve: a file the manifest names, after the containment checks; nothing is opened before them. */
    fun file(rel: String, what: String): File {
        val shown = "$what path '$rel' in ${File(root, MANIFEST)}"
        if (rel.isEmpty() || rel.contains('\u0000') || rel.contains('\\'))
            throw BundleError("$shown is not a relative path inside the bundle", REEXPORT)
        val parts = rel.split('/').filter { it.isNotEmpty() && it != "." }
        if (rel.startsWith("/") || parts.isEmpty() || parts.contains(".."))
            throw BundleError("$shown points outside the bundle", REEXPORT)
        var here = root
        for (p in parts) {
            here = File(here, p)
            if (Files.isSymbolicLink(here.toPath())) throw BundleError("$shown passes through a symbolic link ($here)", REEXPORT)
            if (!here.exists()) throw BundleError("$shown: $here does not exist", "copy the whole bundle directory again")
        }
        if (!here.isFile) throw BundleError("$shown is not a regular file", REEXPORT)
        if (!here.canonicalPath.startsWith(root.canonicalPath + File.separator))
            throw BundleError("$shown points outside the bundle", REEXPORT)
        if (!manifest.getJSONObject("files").has(parts.joinToString("/")))
            throw BundleError("$shown is not listed in the manifest's files (it has no checksum)", REEXPORT)
        return here
    }

    /** bundle.verify: every listed file's size and streamed SHA-256; missing, extra, linked or special files fail. */
    fun verifyChecksums() {
        val listed = manifest.optJSONObject("files")
            ?: throw BundleError("${File(root, MANIFEST)} has no files table (an object of path -> sha256 and size)", REEXPORT)
        val device = manifest.optJSONArray("device_files")?.let { a -> (0 until a.length()).map { a.getString(it) } } ?: emptyList()
        val present = HashSet<String>()
        walk(root, "", present)
        val names = listed.keys().asSequence().toList()
        val missing = names.filter { it !in present }.sorted()
        if (missing.isNotEmpty()) throw BundleError("$root is missing ${missing.take(5).joinToString()}",
            "copy the whole bundle directory again")
        for (rel in names) {
            val rec = listed.getJSONObject(rel)
            val f = File(root, rel)                  // one of the walked files: inside the bundle
            if (f.length() != rec.getLong("size") || sha256(f) != rec.getString("sha256")) throw BundleError(
                "$f does not match its checksum in $MANIFEST (modified or corrupt)",
                "copy the bundle again or re-export it; never edit bundle files by hand")
        }
        val extra = present.filter { it !in names && (device.isEmpty() || device.none { d -> it.startsWith(d) }) }.sorted()
        if (extra.isNotEmpty()) throw BundleError("$root holds files the manifest does not list: ${extra.take(5).joinToString()}",
            "remove them, or re-export the bundle")
    }

    private fun walk(dir: File, prefix: String, out: MutableSet<String>) {
        for (f in dir.listFiles().orEmpty().sortedBy { it.name }) {
            if (Files.isSymbolicLink(f.toPath())) throw BundleError(
                "$f is a symbolic link; bundles hold only plain files and directories",
                "copy the bundle without links (adb push copies files), or re-export it")
            val rel = prefix + f.name
            when {
                f.isDirectory -> walk(f, "$rel/", out)
                !f.isFile -> throw BundleError("$f is not a regular file", "remove it, or re-export the bundle")
                rel != MANIFEST -> out.add(rel)
            }
        }
    }

    /** The golden cases of golden/golden.json, or null for a bundle exported before bundles carried them. */
    fun goldenCases(): List<GoldenCase>? {
        val rec = manifest.optJSONObject("golden") ?: return null
        val f = file(rec.optString("path", GOLDEN_JSON), "golden cases")
        val data = try { JSONObject(f.readText()) } catch (e: Exception) {
            throw BundleError("$f is not readable JSON (${e.message?.take(120)})", "export the bundle again")
        }
        if (data.optString("kind") != "vlm") throw BundleError("$f holds ${data.optString("kind")} cases but the bundle " +
            "is a vlm bundle", "export the bundle again")
        val cases = data.getJSONArray("cases")
        return (0 until cases.length()).map { i ->
            val c = cases.getJSONObject(i)
            val eager = c.getJSONObject("eager")
            val top = eager.getJSONObject("top5")
            val ids = top.getJSONArray("ids")
            val logits = top.getJSONArray("logits")
            val tokens = ints(eager.getJSONArray("tokens"))
            if (ids.length() != tokens.size || logits.length() != tokens.size)
                throw BundleError("$f: cases[$i] needs a prompt and one top-k row per eager token", "export the bundle again")
            val crit = c.getJSONObject("criteria")
            GoldenCase(c.getString("id"), c.getString("image"), c.getString("prompt"), tokens,
                TopK(Array(ids.length()) { ints(ids.getJSONArray(it)) },
                    Array(logits.length()) { doubles(logits.getJSONArray(it)) }, doubles(top.getJSONArray("logsumexp"))),
                crit.keys().asSequence().associateWith { crit.get(it) })
        }
    }

    val madeBy: String? get() = manifest.optString("edgevlm_version").ifEmpty { null }

    companion object {
        /** read_manifest, then (by default) verify: open a bundle directory, checksums checked. */
        fun open(dir: File, verify: Boolean = true): Bundle {
            if (!dir.isDirectory) throw BundleError("no bundle at $dir", "push a directory made by `edgevlm export` (README)")
            val path = File(dir, MANIFEST)
            if (Files.isSymbolicLink(path.toPath()) || !path.isFile)
                throw BundleError("$dir has no $MANIFEST (or it is a link)", "push a directory made by `edgevlm export`")
            if (path.length() > MAX_MANIFEST_BYTES) throw BundleError("$path is over ${MAX_MANIFEST_BYTES shr 20} MiB", REEXPORT)
            val manifest = try { JSONObject(path.readText()) } catch (e: Exception) {
                throw BundleError("$path is not valid JSON (${e.message?.take(120)})", REEXPORT)
            }
            val b = Bundle(dir, manifest)
            if (verify) b.verifyChecksums()
            return b
        }

        /** Streamed SHA-256 (1 MiB reads), lower-case hex as bundle.sha256_file. */
        fun sha256(f: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            FileInputStream(f).use { s ->
                val buf = ByteArray(1 shl 20)
                while (true) {
                    val n = s.read(buf)
                    if (n < 0) break
                    md.update(buf, 0, n)
                }
            }
            return md.digest().joinToString("") { "%02x".format(it) }
        }

        private fun ints(a: JSONArray) = IntArray(a.length()) { a.getInt(it) }
        private fun doubles(a: JSONArray) = DoubleArray(a.length()) { a.getDouble(it) }
        private fun floats(a: JSONArray) = FloatArray(a.length()) { a.getDouble(it).toFloat() }
    }
}

// A bundle directory on the phone: edgevlm/bundle.py's read_manifest, verify (every listed file's size and streamed
// SHA-256; missing, extra, linked or special files refused) and resolve (a path the manifest names must be relative,
// stay inside the bundle, pass through no link and be listed with its checksum; a directory such as an .mlpackage:
// every file under it listed). The manifest is read generically (JSONSerialization); tests/test_apps_ios.py checks
// every key this package reads (the j*(dict, "key") calls) against the bundle contract.
import CryptoKit
import Foundation

public typealias JSON = [String: Any]

public let MANIFEST = "manifest.json"
public let MAX_MANIFEST_BYTES = 16 << 20
let REEXPORT = "re-export the bundle with `edgevlm export --target ios`"

// -- typed reads of the manifest (every key the package reads goes through these) ----------------------------------
func jobj(_ d: JSON, _ key: String, _ whereText: String) throws -> JSON {
    guard let v = d[key] as? JSON else { throw BundleError("\(whereText) has no \(key) block", REEXPORT) }
    return v
}
func jstr(_ d: JSON, _ key: String, _ whereText: String) throws -> String {
    guard let v = d[key] as? String else { throw BundleError("\(whereText) has no text \(key)", REEXPORT) }
    return v
}
func jint(_ d: JSON, _ key: String, _ whereText: String) throws -> Int {
    guard let v = d[key] as? NSNumber, !isBool(v) else { throw BundleError("\(whereText) has no number \(key)", REEXPORT) }
    return v.intValue
}
func jdouble(_ d: JSON, _ key: String, _ whereText: String) throws -> Double {
    guard let v = d[key] as? NSNumber, !isBool(v) else { throw BundleError("\(whereText) has no number \(key)", REEXPORT) }
    return v.doubleValue
}
func jbool(_ d: JSON, _ key: String, _ fallback: Bool) -> Bool {
    guard let v = d[key] as? NSNumber, isBool(v) else { return fallback }
    return v.boolValue
}
func jints(_ d: JSON, _ key: String, _ whereText: String) throws -> [Int] {
    guard let v = d[key] as? [NSNumber] else { throw BundleError("\(whereText) has no list of numbers \(key)", REEXPORT) }
    return v.map { $0.intValue }
}
func jdoubles(_ d: JSON, _ key: String, _ whereText: String) throws -> [Double] {
    guard let v = d[key] as? [NSNumber] else { throw BundleError("\(whereText) has no list of numbers \(key)", REEXPORT) }
    return v.map { $0.doubleValue }
}
func jarr(_ d: JSON, _ key: String, _ whereText: String) throws -> [Any] {
    guard let v = d[key] as? [Any] else { throw BundleError("\(whereText) has no list \(key)", REEXPORT) }
    return v
}
func jhas(_ d: JSON, _ key: String) -> Bool { d[key] != nil && !(d[key] is NSNull) }

/// JSONSerialization gives booleans as NSNumber; CFBoolean tells them from 0 and 1.
func isBool(_ n: NSNumber) -> Bool { CFGetTypeID(n as CFTypeRef) == CFBooleanGetTypeID() }

/// An opened bundle (bundle.read_manifest + bundle.verify): the manifest and the blocks the pipeline reads.
public final class VLMBundle: @unchecked Sendable {
    public let root: URL
    public let manifest: JSON
    public let generation: JSON
    public let parts: JSON
    public let target: JSON
    var shown: String { root.appendingPathComponent(MANIFEST).path }

    init(root: URL, manifest: JSON) throws {
        self.root = root.standardizedFileURL
        self.manifest = manifest
        let whereText = root.appendingPathComponent(MANIFEST).path
        guard manifest["generation"] is JSON, manifest["parts"] is JSON else {
            throw BundleError("\(whereText) lacks the generation/parts blocks of a VLM bundle", "export it again")
        }
        generation = try jobj(manifest, "generation", whereText)
        parts = try jobj(manifest, "parts", whereText)
        target = try jobj(manifest, "target", whereText)
        let task = (manifest["task"] as? String) ?? "?"
        if task != "vlm" { throw BundleError("\(root.path) is a \(task) bundle, not a VLM bundle", "pass a bundle exported for a VLM") }
        let format = (target["format"] as? String) ?? "?"
        if format != "coreml" {
            throw BundleError("\(root.path) was exported for target '\((target["name"] as? String) ?? "?")' (\(format)), which "
                + "Core ML cannot run", "export the model again with --target ios")
        }
        if !jhas(parts, "decoder_coreml") {
            throw BundleError("\(root.path) holds no stateful Core ML decoder (parts: \(parts.keys.sorted().joined(separator: ", ")))",
                REEXPORT)
        }
    }

    /// bundle.read_manifest, then (by default) bundle.verify: the directory as the exporter wrote it.
    public static func open(_ dir: URL, verify: Bool = true) throws -> VLMBundle {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir.path, isDirectory: &isDir), isDir.boolValue else {
            throw BundleError("no bundle at \(dir.path)", "copy a directory made by `edgevlm export --target ios` (README)")
        }
        let path = dir.appendingPathComponent(MANIFEST)
        let attrs = try? FileManager.default.attributesOfItem(atPath: path.path)   // does not follow a link
        guard let type = attrs?[.type] as? FileAttributeType, type == .typeRegular else {
            throw BundleError("\(dir.path) has no \(MANIFEST) (or it is a link)", "copy a directory made by `edgevlm export`")
        }
        if let size = attrs?[.size] as? NSNumber, size.intValue > MAX_MANIFEST_BYTES {
            throw BundleError("\(path.path) is over \(MAX_MANIFEST_BYTES >> 20) MiB", REEXPORT)
        }
        let manifest: JSON
        do {
            guard let m = try JSONSerialization.jsonObject(with: Data(contentsOf: path)) as? JSON else {
                throw BundleError("\(path.path) is not a JSON object", REEXPORT)
            }
            manifest = m
        } catch let e as EdgeVLMError { throw e } catch {
            throw BundleError("\(path.path) is not valid JSON (\(String(describing: error).prefix(120)))", REEXPORT)
        }
        let b = try VLMBundle(root: dir, manifest: manifest)
        if verify { try b.verifyChecksums() }
        return b
    }

    // -- bundle.resolve ----------------------------------------------------------------------------------------------
    /// A file (or package directory) the manifest names, after the containment checks; nothing is opened before them.
    public func file(_ rel: String, _ what: String) throws -> URL {
        let shownRel = "\(what) path '\(rel)' in \(shown)"
        if rel.isEmpty || rel.contains("\u{0}") || rel.contains("\\") {
            throw BundleError("\(shownRel) is not a relative path inside the bundle", REEXPORT)
        }
        let comps = rel.split(separator: "/").map(String.init).filter { $0 != "." }
        if rel.hasPrefix("/") || comps.isEmpty || comps.contains("..") {
            throw BundleError("\(shownRel) points outside the bundle", REEXPORT)
        }
        var here = root
        var type = FileAttributeType.typeDirectory
        for c in comps {
            here = here.appendingPathComponent(c)
            guard let t = (try? FileManager.default.attributesOfItem(atPath: here.path))?[.type] as? FileAttributeType else {
                throw BundleError("\(shownRel): \(here.path) does not exist", "copy the whole bundle directory again")
            }
            if t == .typeSymbolicLink { throw BundleError("\(shownRel) passes through a symbolic link (\(here.path))", REEXPORT) }
            type = t
        }
        let key = comps.joined(separator: "/")
        let listed = (manifest["files"] as? JSON) ?? [:]
        if type == .typeDirectory {
            let inside = Set(listed.keys.filter { $0.hasPrefix(key + "/") })
            let present = try walk(here, prefix: key + "/")
            if inside.isEmpty || !present.subtracting(inside).isEmpty {
                throw BundleError("\(shownRel) is a directory whose files are not all listed in the manifest's files", REEXPORT)
            }
            return here
        }
        if type != .typeRegular { throw BundleError("\(shownRel) is not a regular file", REEXPORT) }
        if listed[key] == nil { throw BundleError("\(shownRel) is not listed in the manifest's files (it has no checksum)", REEXPORT) }
        return here
    }

    /// The file of parts[name]: its record (path, format, precision, details) and the resolved URL.
    public func part(_ name: String) throws -> (record: JSON, url: URL) {
        guard let rec = parts[name] as? JSON else {
            throw BundleError("\(root.path) has no \(name) part", "copy the whole bundle directory again, or re-export")
        }
        return (rec, try file(try jstr(rec, "path", "part \(name)"), "part '\(name)'"))
    }

    // -- bundle.verify -----------------------------------------------------------------------------------------------
    /// Every listed file's size and SHA-256; missing, extra, linked or special files fail.
    public func verifyChecksums() throws {
        guard let listed = manifest["files"] as? JSON else {
            throw BundleError("\(shown) has no files table (an object of path -> sha256 and size)", REEXPORT)
        }
        let device = (manifest["device_files"] as? [String]) ?? []
        let present = try walk(root, prefix: "")
        let missing = listed.keys.filter { !present.contains($0) }.sorted()
        if !missing.isEmpty {
            throw BundleError("\(root.path) is missing \(missing.prefix(5).joined(separator: ", "))", "copy the whole bundle directory again")
        }
        for (rel, value) in listed {
            guard let rec = value as? JSON, let want = rec["sha256"] as? String, let size = rec["size"] as? NSNumber else {
                throw BundleError("\(shown) lists '\(rel.prefix(100))' without a sha256 string and a size", REEXPORT)
            }
            let f = root.appendingPathComponent(rel)            // one of the walked files: inside the bundle
            let have = ((try? FileManager.default.attributesOfItem(atPath: f.path))?[.size] as? NSNumber)?.intValue
            var sum = ""
            if have == size.intValue { sum = try VLMBundle.sha256(f) }        // no hashing when the size already differs
            if have != size.intValue || sum != want {
                throw BundleError("\(f.path) does not match its checksum in \(MANIFEST) (modified or corrupt)",
                    "copy the bundle again or re-export it; never edit bundle files by hand")
            }
        }
        let extra = present.filter { f in listed[f] == nil && (device.isEmpty || !device.contains { f.hasPrefix($0) }) }.sorted()
        if !extra.isEmpty {
            throw BundleError("\(root.path) holds files the manifest does not list: \(extra.prefix(5).joined(separator: ", "))",
                "remove them, or re-export the bundle")
        }
    }

    /// bundle._files: the relative paths of every regular file under dir (the top manifest aside); links refused.
    func walk(_ dir: URL, prefix: String) throws -> Set<String> {
        var out = Set<String>()
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        for name in names.sorted() {
            let f = dir.appendingPathComponent(name)
            let t = (try? FileManager.default.attributesOfItem(atPath: f.path))?[.type] as? FileAttributeType
            let rel = prefix + name
            switch t {
            case .typeSymbolicLink?:
                throw BundleError("\(f.path) is a symbolic link; bundles hold only plain files and directories",
                    "copy the bundle without links, or re-export it")
            case .typeDirectory?: out.formUnion(try walk(f, prefix: rel + "/"))
            case .typeRegular?: if rel != MANIFEST { out.insert(rel) }
            default: throw BundleError("\(f.path) is not a regular file", "remove it, or re-export the bundle")
            }
        }
        return out
    }

    /// bundle.sha256_file: streamed SHA-256 (1 MiB reads), lower-case hex.
    public static func sha256(_ url: URL) throws -> String {
        let h = try FileHandle(forReadingFrom: url)
        defer { try? h.close() }
        var hasher = SHA256()
        while let chunk = try h.read(upToCount: 1 << 20), !chunk.isEmpty { hasher.update(data: chunk) }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }

    public var madeBy: String? { manifest["edgevlm_version"] as? String }
}

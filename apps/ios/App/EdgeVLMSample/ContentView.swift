// Pick a photo, ask, the answer streams in, then time to first token and tokens/s; "Verify" runs the bundle's golden
// cases on the phone. The bundle is read from the app's Documents/bundle (copied with Finder or the Files app, see
// README) or, failing that, from a folder reference named "bundle" in the app's resources.
import EdgeVLM
import PhotosUI
import SwiftUI

struct ContentView: View {
    @State private var pipeline: VLMPipeline?
    @State private var item: PhotosPickerItem?
    @State private var image: RgbImage?                 // what the model sees (load_image)
    @State private var preview: UIImage?                // what the screen shows
    @State private var question = "Describe the image."
    @State private var answer = ""
    @State private var status = "loading the bundle…"
    @State private var report = ""
    @State private var busy = true

    var body: some View {
        ScrollView {
            VStack(alignment: .leading, spacing: 12) {
                HStack {
                    PhotosPicker(selection: $item, matching: .images) { Text("Pick a photo") }
                    Button("Verify") { Task { await verify() } }.disabled(pipeline == nil || busy)
                }
                if let preview {
                    Image(uiImage: preview).resizable().scaledToFit().frame(maxHeight: 240)
                }
                TextField("Question", text: $question, axis: .vertical).textFieldStyle(.roundedBorder)
                Button("Ask") { Task { await ask() } }.disabled(pipeline == nil || busy)
                Text(answer).font(.body)
                Text(status).font(.footnote).foregroundStyle(.secondary)
                Text(report).font(.system(.caption2, design: .monospaced))
            }
            .padding()
        }
        .task { await load() }
        .onChange(of: item) { _, newItem in Task { await pick(newItem) } }
    }

    func bundleURL() -> URL? {
        let docs = URL.documentsDirectory.appendingPathComponent("bundle")
        if FileManager.default.fileExists(atPath: docs.path) { return docs }
        return Bundle.main.url(forResource: "bundle", withExtension: nil)
    }

    func load() async {
        guard let url = bundleURL() else {
            status = "no bundle: copy one to the app's Documents/bundle (README)"
            busy = false
            return
        }
        do {
            status = "verifying checksums and compiling the Core ML parts (the first time takes a while)…"
            let p = try await VLMPipeline.load(url)
            pipeline = p
            let placement = await p.placement                // an actor's property: read across the actor boundary
            status = "bundle loaded, checksums verified (\(placement))"
        } catch {
            status = "no bundle: \(error)"
        }
        busy = false
    }

    func pick(_ newItem: PhotosPickerItem?) async {
        guard let newItem else { return }
        do {
            guard let data = try await newItem.loadTransferable(type: Data.self) else { status = "cannot read the photo"; return }
            image = try loadImage(data, what: "the picked photo")
            preview = UIImage(data: data)
        } catch {
            status = "\(error)"
        }
    }

    func ask() async {
        guard let pipeline else { return }
        busy = true
        answer = ""
        status = "thinking…"
        do {
            for try await piece in pipeline.generate(image, question) { answer += piece }
            if let s = await pipeline.lastStats {
                status = String(format: "time to first token %.2f s · %.1f tokens/s · %d new tokens (%@)",
                                s.timeToFirstTokenS, s.decodeTokensPerS, s.newTokens, s.stoppedBy)
            }
        } catch {
            status = "\(error)"
        }
        busy = false
    }

    func verify() async {
        guard let pipeline else { return }
        busy = true
        status = "verifying the golden cases…"
        do {
            let rep = try await pipeline.verify()
            report = rep.format()
            status = rep.passed ? "golden cases: PASS" : "golden cases: FAIL (see the table)"
        } catch {
            status = "verify failed: \(error)"
        }
        busy = false
    }
}

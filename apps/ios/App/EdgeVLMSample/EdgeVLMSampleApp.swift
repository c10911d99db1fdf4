// The sample app's entry point. Add this folder to an Xcode iOS App target that depends on the EdgeVLM package
// (README: "The sample app"). Not compiled or run anywhere yet.
import SwiftUI

@main
struct EdgeVLMSampleApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}

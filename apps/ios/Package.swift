// swift-tools-version: 5.10
// EdgeVLM: run an edgevlm ios bundle (Core ML parts + stateful decoder) on iPhone, iPad and Apple-silicon Macs.
// Not compiled in this repository's CI or anywhere else yet: see README.md.
import PackageDescription

let package = Package(
    name: "EdgeVLM",
    platforms: [.iOS(.v18), .macOS(.v15)],          // MLState (stateful Core ML models) needs iOS 18 / macOS 15
    products: [
        .library(name: "EdgeVLM", targets: ["EdgeVLM"]),
    ],
    dependencies: [
        // swift-transformers 1.3.3 (tag of May 2026): the Tokenizers and Hub products
        .package(url: "https://github.com/huggingface/swift-transformers.git", exact: "1.3.3"),
    ],
    targets: [
        .target(
            name: "EdgeVLM",
            dependencies: [
                .product(name: "Tokenizers", package: "swift-transformers"),
                .product(name: "Hub", package: "swift-transformers"),
            ]
        ),
    ]
)

// edgevlm/errors.py: every error names the problem and the fix ("problem — fix: fix"). Pure Swift (Foundation only).
import Foundation

public enum EdgeVLMErrorKind: String, Sendable { case bundle, config, image }

/// errors.EdgeVLMError and its subclasses BundleError, ConfigError, ImageError (``kind`` says which).
public struct EdgeVLMError: Error, LocalizedError, CustomStringConvertible, Sendable {
    public let kind: EdgeVLMErrorKind
    public let problem: String
    public let fix: String?

    public var description: String { problem + (fix.map { " — fix: \($0)" } ?? "") }
    public var errorDescription: String? { description }
}

/// errors.BundleError
public func BundleError(_ problem: String, _ fix: String? = nil) -> EdgeVLMError { EdgeVLMError(kind: .bundle, problem: problem, fix: fix) }
/// errors.ConfigError
public func ConfigError(_ problem: String, _ fix: String? = nil) -> EdgeVLMError { EdgeVLMError(kind: .config, problem: problem, fix: fix) }
/// errors.ImageError
public func ImageError(_ problem: String, _ fix: String? = nil) -> EdgeVLMError { EdgeVLMError(kind: .image, problem: problem, fix: fix) }

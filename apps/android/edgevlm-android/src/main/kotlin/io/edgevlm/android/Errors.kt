// edgevlm/errors.py: each error names the problem and the fix ("problem — fix: fix"). Pure Kotlin.
package io.edgevlm.android

open class EdgeVlmError(val problem: String, val fix: String? = null) :
    Exception(problem + (if (fix != null) " — fix: $fix" else ""))

class BundleError(problem: String, fix: String? = null) : EdgeVlmError(problem, fix)
class ConfigError(problem: String, fix: String? = null) : EdgeVlmError(problem, fix)
class ImageError(problem: String, fix: String? = null) : EdgeVlmError(problem, fix)

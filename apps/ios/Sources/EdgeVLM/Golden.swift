// edgevlm/runtime/golden.py, ported: the golden cases' figures (vlm_figures, coarse_kl, log_softmax), the criteria
// (vlm_criteria, with the same margins) and the judging (judge, Row, Report, verify). Pure Swift (Foundation only);
// VLMPipeline.verify() reads golden/golden.json (goldenCases) and hands this file a trace function (vlmTrace).
// tests/test_apps_ios.py checks these constants against runtime/golden.py.
import Foundation

public let GOLDEN_DIR = "golden"
public let GOLDEN_JSON = "golden/golden.json"
public let VERSION = 1
public let TOP_K = 5
public let NEW_TOKENS = 32
public let TOP1_MARGIN = 0.10
public let PREFIX_FRACTION = 0.5
public let KL_FACTOR = 2.0
public let TIE_GAP = 0.25
public let KL_SLACK = 0.02
public let KL_SLACK_INT4 = 0.05
public let VLM_CRITERIA = ["same_greedy_tokens", "teacher_forced_top1_agreement_min", "prefix_tokens_min", "kl_mean_max"]

/// A criterion's bound or a figure: a Bool (must be equal) or a number.
public enum GoldenValue: Equatable, CustomStringConvertible, Sendable {
    case bool(Bool)
    case number(Double)
    public var description: String {
        switch self {
        case .bool(let b): return b ? "True" : "False"                      // as Python prints them
        case .number(let d): return d == d.rounded() && abs(d) < 1e15 ? String(Int(d)) : String(d)
        }
    }
    var double: Double? { if case .number(let d) = self { return d }; return nil }
}

/// eager.top5 of a case: per step the top-k ids, their logits and the row's logsumexp.
public struct TopK: Sendable { public let ids: [[Int]]; public let logits: [[Double]]; public let logsumexp: [Double] }

/// One VLM case of golden.json; criteria in file order ("basis" left out).
public struct GoldenCase: Sendable {
    public let id: String
    public let image: String
    public let prompt: String
    public let tokens: [Int]
    public let top5: TopK
    public let criteria: [(String, GoldenValue)]
}

/// golden.vlm_trace's result: greedy ids (no early stop), logits teacher-forced on eager's tokens.
public struct Trace { public let ids: [Int]; public let logits: [[Float]]; public let promptLen: Int }

/// golden.log_softmax in Double.
public func logSoftmax(_ x: [Float]) -> [Double] {
    let m = Double(x.max() ?? 0)
    let lse = log(x.reduce(0.0) { $0 + exp(Double($1) - m) })
    return x.map { Double($0) - m - lse }
}

/// golden.coarse_kl: KL(eager || device) per row over eager's top-k tokens and one bin for all others.
public func coarseKl(_ ref: TopK, _ logits: [[Float]]) throws -> [Double] {
    let width = logits.first?.count ?? 0
    if let top = ref.ids.flatMap({ $0 }).max(), top >= width {
        throw BundleError("a golden case names id \(top) but the model gives \(width) logits", "export the bundle again")
    }
    let eps = 1e-12
    func term(_ a: Double, _ b: Double) -> Double { a > eps ? a * (log(max(a, eps)) - log(max(b, eps))) : 0 }
    return ref.ids.indices.map { r in
        let lq = logSoftmax(logits[r])
        var kl = 0.0, pSum = 0.0, qSum = 0.0
        for j in ref.ids[r].indices {
            let p = exp(ref.logits[r][j] - ref.logsumexp[r]), q = exp(lq[ref.ids[r][j]])
            kl += term(p, q); pSum += p; qSum += q
        }
        return max(kl + term(min(max(1 - pSum, 0), 1), min(max(1 - qSum, 0), 1)), 0)
    }
}

/// golden.vlm_figures: a device's greedy ``ids`` and its teacher-forced logits against the case.
public func vlmFigures(_ c: GoldenCase, _ ids: [Int], _ forcedLogits: [[Float]]) throws -> [String: GoldenValue] {
    let ref = c.tokens, n = ref.count
    if forcedLogits.count < n {
        throw ConfigError("the device gave \(forcedLogits.count) teacher-forced steps for \(n) golden tokens", "report this as a bug")
    }
    let forced = Array(forcedLogits[0..<n])
    let first = zip(ref, ids).enumerated().first { $0.element.0 != $0.element.1 }?.offset
    let prefix = first ?? min(ids.count, n)
    let agree = (0..<n).filter { argmax(forced[$0]) == c.top5.ids[$0][0] }.count
    let kl = try coarseKl(c.top5, forced)
    return ["same_greedy_tokens": .bool(first == nil && ids.count >= n), "prefix_tokens": .number(Double(prefix)),
            "teacher_forced_top1_agreement": .number(Double(agree) / Double(n)),
            "kl_mean": .number(kl.reduce(0, +) / Double(kl.count)), "new_tokens": .number(Double(n))]
}

/// Python's round(x, digits) (half-even; on the decimal scaling, which can differ from Python's exact-binary rounding
/// in the last digit of rare ties).
public func pyRound(_ x: Double, _ digits: Int) -> Double {
    let f = pow(10.0, Double(digits))
    return (x * f).rounded(.toNearestOrEven) / f
}

/// golden.first_near_tie: the first step at which eager's two best logits lie within TIE_GAP nats, or nil.
public func firstNearTie(_ logits: [[Double]]) -> Int? {
    for (i, row) in logits.enumerated() where row.count > 1 && row[0] - row[1] < TIE_GAP { return i }
    return nil
}

/// golden.vlm_criteria: one case's criteria from its figures on every decoder (the loosest of them); `nearTie`
/// (firstNearTie of the case's eager top-k logits) caps the prefix bound.
public func vlmCriteria(_ precision: String, _ measured: [[String: Double]], nearTie: Int? = nil) -> [(String, GoldenValue)] {
    if precision == "fp32" { return [("same_greedy_tokens", .bool(true)), ("teacher_forced_top1_agreement_min", .number(1.0))] }
    if measured.isEmpty { return [("teacher_forced_top1_agreement_min", .number(0.5)), ("kl_mean_max", .number(0.5))] }
    let top1 = measured.map { $0["teacher_forced_top1_agreement"] ?? 0 }.min()!
    let prefix = measured.map { $0["prefix_tokens"] ?? 0 }.min()!
    let kl = measured.map { $0["kl_mean"] ?? 0 }.max()!
    var prefixMin = floor(PREFIX_FRACTION * prefix)
    if let tie = nearTie { prefixMin = min(prefixMin, Double(tie)) }
    let slack = precision == "int4" ? KL_SLACK_INT4 : KL_SLACK
    return [("teacher_forced_top1_agreement_min", .number(pyRound(max(0, top1 - TOP1_MARGIN), 4))),
            ("prefix_tokens_min", .number(prefixMin)),
            ("kl_mean_max", .number(pyRound(KL_FACTOR * kl + slack, 6)))]
}

/// golden.Row
public struct Row: Sendable {
    public let caseId: String
    public let backend: String
    public let criterion: String
    public let measured: GoldenValue
    public let bound: GoldenValue
    public let passed: Bool
}

/// golden.judge: one row per criterion; ``X_min`` / ``X_max`` bound figure X, any other name must equal it.
public func judge(_ caseId: String, _ backend: String, _ figures: [String: GoldenValue], _ criteria: [(String, GoldenValue)]) throws -> [Row] {
    try criteria.compactMap { (entry: (String, GoldenValue)) throws -> Row? in
        let (key, bound) = entry
        if key == "basis" { return nil }
        let suffix = String(key.suffix(4))
        let bounded = suffix == "_min" || suffix == "_max"
        let name = bounded ? String(key.dropLast(4)) : key
        guard let got = figures[name] else {
            throw BundleError("a golden case has the unknown criterion \(key)", "export the bundle again with this package's edgevlm version")
        }
        let sign: String, ok: Bool
        switch suffix {
        case "_min": sign = ">="; ok = (got.double ?? .nan) >= (bound.double ?? .nan)
        case "_max": sign = "<="; ok = (got.double ?? .nan) <= (bound.double ?? .nan)
        default: sign = "=="; ok = got == bound
        }
        let shown: GoldenValue = got.double.map { GoldenValue.number(pyRound($0, 6)) } ?? got
        return Row(caseId: caseId, backend: backend, criterion: "\(name) \(sign) \(bound)", measured: shown, bound: bound, passed: ok)
    }
}

/// golden.Report
public struct Report: Sendable {
    public let bundle: String
    public let backend: String
    public let golden: Bool
    public var rows: [Row] = []
    public var note = ""
    public var placement = ""
    public var passed: Bool { rows.allSatisfy { $0.passed } }

    /// golden.format_reports for one report, one line per row.
    public func format() -> String {
        var lines = rows.map { "\($0.caseId)  \($0.backend)  \($0.criterion)  \($0.measured)  \($0.passed ? "pass" : "FAIL")" }
        if !note.isEmpty { lines.append("\(backend): \(note)") }
        lines.append("\(bundle) on \(backend)" + (placement.isEmpty ? "" : " (\(placement))") + ": \(passed ? "PASS" : "FAIL")"
            + (golden ? "" : " (no golden cases: see the note)"))
        return lines.joined(separator: "\n")
    }
}

/// golden.read_golden for VLM cases: golden/golden.json, or nil for a bundle exported before bundles carried them.
func goldenCases(_ b: VLMBundle) throws -> [GoldenCase]? {
    guard let rec = b.manifest["golden"] as? JSON else { return nil }
    let f = try b.file((rec["path"] as? String) ?? GOLDEN_JSON, "golden cases")
    guard let data = try? JSONSerialization.jsonObject(with: Data(contentsOf: f)) as? JSON else {
        throw BundleError("\(f.path) is not readable JSON", "export the bundle again")
    }
    let w = f.path
    if (data["kind"] as? String) != "vlm" {
        throw BundleError("\(w) holds \((data["kind"] as? String) ?? "?") cases but the bundle is a vlm bundle", "export the bundle again")
    }
    return try jarr(data, "cases", w).enumerated().map { (pair: (offset: Int, element: Any)) throws -> GoldenCase in
        let i = pair.offset
        guard let c = pair.element as? JSON else { throw BundleError("\(w): cases[\(i)] is not an object", "export the bundle again") }
        let eager = try jobj(c, "eager", w), top = try jobj(eager, "top5", w)
        let tokens = try jints(eager, "tokens", w)
        let ids = (try jarr(top, "ids", w)).map { (($0 as? [NSNumber]) ?? []).map { $0.intValue } }
        let logits = (try jarr(top, "logits", w)).map { (($0 as? [NSNumber]) ?? []).map { $0.doubleValue } }
        let lse = try jdoubles(top, "logsumexp", w)
        if ids.count != tokens.count || logits.count != tokens.count || lse.count != tokens.count {
            throw BundleError("\(w): cases[\(i)] needs a prompt and one top-k row per eager token", "export the bundle again")
        }
        // criteria in file order: JSONSerialization's dictionaries are unordered, so order by VLM_CRITERIA
        let raw = try jobj(c, "criteria", w)
        let crit: [(String, GoldenValue)] = raw.keys.sorted { (VLM_CRITERIA.firstIndex(of: $0) ?? 99, $0) < (VLM_CRITERIA.firstIndex(of: $1) ?? 99, $1) }
            .compactMap { (k: String) -> (String, GoldenValue)? in
                guard k != "basis", let n = raw[k] as? NSNumber else { return nil }
                return (k, isBool(n) ? GoldenValue.bool(n.boolValue) : GoldenValue.number(n.doubleValue))
            }
        return GoldenCase(id: try jstr(c, "id", w), image: try jstr(c, "image", w), prompt: try jstr(c, "prompt", w),
                          tokens: tokens, top5: TopK(ids: ids, logits: logits, logsumexp: lse), criteria: crit)
    }
}

/// golden.verify for VLM cases: trace each case on the device and judge it by its stored criteria.
public func verify(bundle: String, backend: String, placement: String, cases: [GoldenCase],
                   trace: (GoldenCase) throws -> Trace) throws -> Report {
    var rep = Report(bundle: bundle, backend: backend, golden: true, placement: placement)
    for c in cases {
        let got = try trace(c)
        rep.rows += try judge(c.id, backend, try vlmFigures(c, got.ids, got.logits), c.criteria)
    }
    return rep
}

/// golden._no_golden
public func noGolden(bundle: String, backend: String, madeBy: String?) -> Report {
    Report(bundle: bundle, backend: backend, golden: false, note:
        "no golden cases (exported by edgevlm \(madeBy ?? "an older edgevlm"), before bundles carried them): verified by "
        + "what it has, the checksums of every file; export it again for a device check")
}

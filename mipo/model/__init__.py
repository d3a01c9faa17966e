"""Model: loading, precision, log-probs (prompt trees and their attention), generation and its KV cache."""

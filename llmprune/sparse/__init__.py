"""SparseLinear and kernel dispatch (the kernels themselves live in the llmprune_kernels
package)."""

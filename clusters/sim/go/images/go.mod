// Tiny static programs that clusters/sim packs into test images for the real
// nodes (no Docker: see clusters/sim/push-image). Standard library only.
module kube-prefetch.local/sim/images

go 1.26.0

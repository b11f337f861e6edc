// image-reporter plays the kubelet's part in node.status.images for the fake
// (KWOK) nodes of one sim cluster: KWOK moves pods through their lifecycle but
// never reports images. Some seconds (-delay) after a pod on a fake node has a
// container that started (running or terminated, with an imageID: KWOK's
// stages set it only then), the container's image is added to the node's
// status.images, and the list is kept as the kubelet keeps it: sorted by size,
// largest first, and cut to -max-images (the kubelet's nodeStatusMaxImages,
// 50 by default; -1 means no limit). Sizes are made up but deterministic (a
// hash of the name), so every node reports the same size for an image.
//
// Which fake nodes: with -nodes=all every one; with -nodes=annotated (what
// `up` uses unless told otherwise, so the shared test clusters keep nodes
// that list nothing) only those annotated kube-prefetch.sim/report-images=true.
//
// It owns status.images of fake nodes only in the sense that it is the only
// writer in the sim besides tests: it merges into what the node already lists
// (tests and `up --node-images` may set images too) and writes with the node's
// resourceVersion as a precondition, so a concurrent writer is not overwritten.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/distribution/reference"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

const (
	fakeAnnotation   = "kwok.x-k8s.io/node"
	reportAnnotation = "kube-prefetch.sim/report-images"
)

type reporter struct {
	client    kubernetes.Interface
	nodes     cache.Indexer
	delay     time.Duration
	maxImages int
	allNodes  bool

	mu sync.Mutex
	// Per node, images seen started and not yet written, with the time they
	// become due. A pod seen again (every status update) does not push it back.
	pending map[string]map[string]pendingImage
	// Pod uid -> images of it already queued: pods update often, and their
	// containers start one after the other (init containers first).
	seen map[types.UID]map[string]bool
}

type pendingImage struct {
	names []string
	due   time.Time
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster")
	delay := flag.Duration("delay", 3*time.Second, "time from a container's start to its image in node.status.images")
	maxImages := flag.Int("max-images", 50, "images kept in node.status.images, largest first (-1: no limit), as the kubelet's nodeStatusMaxImages")
	nodes := flag.String("nodes", "annotated", "which fake nodes: all, or annotated ("+reportAnnotation+"=true)")
	klog.InitFlags(nil)
	flag.Parse()
	if *nodes != "all" && *nodes != "annotated" {
		klog.Fatalf("-nodes must be all or annotated, got %q", *nodes)
	}

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		klog.Fatalf("loading kubeconfig %q: %v", *kubeconfig, err)
	}
	// A rollout on a 2,000-node cluster reports thousands of images in a
	// short time: do not let client-go's default 5 QPS turn that into minutes.
	config.QPS = 100
	config.Burst = 200
	config.UserAgent = "sim-image-reporter"
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		klog.Fatalf("creating client: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	factory := informers.NewSharedInformerFactory(client, 0)
	nodeInformer := factory.Core().V1().Nodes().Informer()
	podInformer := factory.Core().V1().Pods().Informer()
	r := &reporter{
		client:    client,
		nodes:     nodeInformer.GetIndexer(),
		delay:     *delay,
		maxImages: *maxImages,
		allNodes:  *nodes == "all",
		pending:   map[string]map[string]pendingImage{},
		seen:      map[types.UID]map[string]bool{},
	}
	_, err = podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.observe(obj) },
		UpdateFunc: func(_, obj any) { r.observe(obj) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			if pod, ok := obj.(*corev1.Pod); ok {
				// Its images stay pending: a pulled image outlives its pod.
				r.mu.Lock()
				delete(r.seen, pod.UID)
				r.mu.Unlock()
			}
		},
	})
	if err != nil {
		klog.Fatalf("pod event handler: %v", err)
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), nodeInformer.HasSynced, podInformer.HasSynced) {
		klog.Fatalf("informers did not sync")
	}
	klog.Infof("reporting images of %s fake nodes %s after a container starts, at most %d per node", *nodes, r.delay, r.maxImages)

	ticker := time.NewTicker(200 * time.Millisecond)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			klog.Infof("stopping")
			return
		case now := <-ticker.C:
			r.flush(ctx, now)
		}
	}
}

// observe queues the images of a pod's started containers on its node.
func (r *reporter) observe(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName == "" {
		return
	}
	if cached, exists, err := r.nodes.GetByKey(pod.Spec.NodeName); err != nil || !exists {
		klog.V(2).Infof("pod %s/%s: node %s not known (%v)", pod.Namespace, pod.Name, pod.Spec.NodeName, err)
		return
	} else if node, ok := cached.(*corev1.Node); !ok || !r.reportsFor(node) {
		klog.V(3).Infof("pod %s/%s: node %s not reported", pod.Namespace, pod.Name, pod.Spec.NodeName)
		return
	}
	var started [][]string
	for _, list := range [][]corev1.ContainerStatus{pod.Status.InitContainerStatuses, pod.Status.ContainerStatuses} {
		for _, status := range list {
			if status.ImageID == "" || (status.State.Running == nil && status.State.Terminated == nil) {
				continue
			}
			started = append(started, imageNames(status.Image, status.ImageID))
		}
	}
	if len(started) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen[pod.UID] == nil {
		r.seen[pod.UID] = map[string]bool{}
	}
	node := pod.Spec.NodeName
	due := time.Now().Add(r.delay)
	for _, names := range started {
		if r.seen[pod.UID][names[0]] {
			continue
		}
		r.seen[pod.UID][names[0]] = true
		if r.pending[node] == nil {
			r.pending[node] = map[string]pendingImage{}
		}
		if _, queued := r.pending[node][names[0]]; !queued {
			r.pending[node][names[0]] = pendingImage{names: names, due: due}
		}
	}
}

// reportsFor: a real kubelet reports its own images; fake nodes as -nodes says.
func (r *reporter) reportsFor(node *corev1.Node) bool {
	if node.Annotations[fakeAnnotation] != "fake" {
		return false
	}
	return r.allNodes || node.Annotations[reportAnnotation] == "true"
}

// imageNames returns the names the kubelet (with containerd) reports for an
// image: the normalized tag reference and the repository digest.
func imageNames(image, imageID string) []string {
	names := []string{}
	if named, err := reference.ParseNormalizedNamed(image); err == nil {
		names = append(names, reference.TagNameOnly(named).String())
	} else {
		names = append(names, image)
	}
	digest := strings.TrimPrefix(imageID, "docker-pullable://")
	if named, err := reference.ParseNormalizedNamed(digest); err == nil {
		if canonical, ok := named.(reference.Canonical); ok {
			digest = reference.TrimNamed(named).String() + "@" + canonical.Digest().String()
		}
	}
	if digest != names[0] {
		names = append(names, digest)
	}
	return names
}

// sizeOf is a made-up but stable image size between 5 and 500 MiB.
func sizeOf(name string) int64 {
	sum := sha256.Sum256([]byte(name))
	const mib = 1 << 20
	return 5*mib + int64(binary.BigEndian.Uint64(sum[:8])%(495*mib))
}

// flush writes the due images of every node that has some.
func (r *reporter) flush(ctx context.Context, now time.Time) {
	due := map[string][][]string{}
	r.mu.Lock()
	for node, images := range r.pending {
		for key, image := range images {
			if !image.due.After(now) {
				due[node] = append(due[node], image.names)
				delete(images, key)
			}
		}
		if len(images) == 0 {
			delete(r.pending, node)
		}
	}
	r.mu.Unlock()
	for node, images := range due {
		if err := r.report(ctx, node, images); err != nil {
			klog.Errorf("reporting %d images on node %s: %v", len(images), node, err)
		}
	}
}

// report merges images into the node's status.images, retrying on conflict.
func (r *reporter) report(ctx context.Context, nodeName string, images [][]string) error {
	for attempt := 0; ; attempt++ {
		node, err := r.client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("getting the node: %w", err)
		}
		if !r.reportsFor(node) {
			return nil
		}
		merged, changed := mergeImages(node.Status.Images, images, r.maxImages)
		if !changed {
			return nil
		}
		patch, err := json.Marshal(map[string]any{
			"metadata": map[string]any{"resourceVersion": node.ResourceVersion},
			"status":   map[string]any{"images": merged},
		})
		if err != nil {
			return fmt.Errorf("encoding the patch: %w", err)
		}
		_, err = r.client.CoreV1().Nodes().Patch(ctx, nodeName, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
		if err == nil {
			klog.V(1).Infof("node %s: %d images", nodeName, len(merged))
			return nil
		}
		if !apierrors.IsConflict(err) || attempt >= 10 {
			return fmt.Errorf("patching status.images: %w", err)
		}
	}
}

// mergeImages adds the images the node does not list yet, then keeps the
// kubelet's order (largest first) and limit.
func mergeImages(current []corev1.ContainerImage, images [][]string, limit int) ([]corev1.ContainerImage, bool) {
	known := map[string]bool{}
	for _, image := range current {
		for _, name := range image.Names {
			known[name] = true
		}
	}
	merged := append([]corev1.ContainerImage(nil), current...)
	added := false
	for _, names := range images {
		if len(names) == 0 {
			continue
		}
		if known[names[0]] {
			continue
		}
		for _, name := range names {
			known[name] = true
		}
		merged = append(merged, corev1.ContainerImage{Names: names, SizeBytes: sizeOf(names[0])})
		added = true
	}
	if !added {
		return current, false
	}
	sort.SliceStable(merged, func(a, b int) bool { return merged[a].SizeBytes > merged[b].SizeBytes })
	if limit >= 0 && len(merged) > limit {
		merged = merged[:limit]
	}
	// Images smaller than the 50 listed fall off at once: then the list did
	// not change, and the kubelet would not write it either.
	if len(merged) == len(current) {
		same := true
		for i := range merged {
			if firstName(merged[i]) != firstName(current[i]) {
				same = false
				break
			}
		}
		if same {
			return current, false
		}
	}
	return merged, true
}

func firstName(image corev1.ContainerImage) string {
	if len(image.Names) == 0 {
		return ""
	}
	return image.Names[0]
}

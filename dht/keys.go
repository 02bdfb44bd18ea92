package dht

import (
	"fmt"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
)

// KeyVersion is the version of the key derivation: how a key string (a
// digest or an image reference) becomes the content identifier that is
// looked up in the DHT. It is part of the hashed preimage, so a later
// version can derive keys differently while both versions share one DHT
// protocol: nodes of different versions simply do not find each other's
// records for the changed keys.
const KeyVersion = 1

// keyPreimagePrefix is hashed in front of every key. The NUL byte ends the
// prefix, so no key string can collide with a different prefix.
var keyPreimagePrefix = fmt.Sprintf("peermirror/key/v%d\x00", KeyVersion)

// KeyCID returns the content identifier under which key is advertised and
// resolved: a CIDv1 with the raw codec over the sha2-256 multihash of the
// versioned preimage. It is exported so that tools can show what a node
// looks up.
func KeyCID(key string) cid.Cid {
	// Sum with SHA2_256 and the default length cannot fail.
	mh, err := multihash.Sum([]byte(keyPreimagePrefix+key), multihash.SHA2_256, -1)
	if err != nil {
		panic(fmt.Sprintf("hashing dht key: %v", err))
	}
	return cid.NewCidV1(cid.Raw, mh)
}

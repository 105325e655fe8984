//! libp2p network actor (work in progress)

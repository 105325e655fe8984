//! WebRTC media shell (work in progress)

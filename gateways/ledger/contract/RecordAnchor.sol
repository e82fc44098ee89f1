// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title Anchors batches of encrypted IoT records on the ledger, each Merkle root once.
/// @notice The batch travels in the Anchored event, so a reader needs eth_getLogs only:
/// no transaction fetch, no calldata decoding. On Prague chains this costs nothing
/// extra (the EIP-7623 calldata floor exceeds calldata plus log gas); see
/// gateways/ledger/chain.py for the measurements.
/// Only writers the owner allowed may anchor: otherwise anyone watching the mempool
/// could anchor a writer's root first, and the writer could never anchor its batch.
contract RecordAnchor {
    /// The deployer; the only account that can allow or remove writers.
    address public owner;
    mapping(address => bool) public writers;
    /// Merkle root -> number of the block that anchored it (0: never anchored).
    mapping(bytes32 => uint256) public anchoredAt;
    /// Batches anchored so far; also the id of the latest (ids start at 1).
    uint256 public batches;

    event Anchored(
        uint256 indexed id,
        address indexed writer,
        bytes32 indexed root,
        uint32 count,
        bytes32 contentHash,
        bytes batch,
        bytes signature
    );
    event WriterSet(address indexed writer, bool allowed);

    constructor() {
        owner = msg.sender;
        writers[msg.sender] = true;
        emit WriterSet(msg.sender, true);
    }

    function setWriter(address writer, bool allowed) external {
        require(msg.sender == owner, "not the owner");
        writers[writer] = allowed;
        emit WriterSet(writer, allowed);
    }

    /// Reverts for a root anchored before, so a restarted writer that resends a batch
    /// can never anchor it twice.
    function anchor(
        bytes32 root,
        uint32 count,
        bytes calldata batch,
        bytes calldata signature
    ) external returns (uint256 id) {
        require(writers[msg.sender], "not a writer");
        require(count > 0, "empty batch");
        require(anchoredAt[root] == 0, "already anchored");
        anchoredAt[root] = block.number;
        id = ++batches;
        emit Anchored(id, msg.sender, root, count, keccak256(batch), batch, signature);
    }
}
